from condiff.cli.app import main

main()
