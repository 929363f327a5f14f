"""Shared by the contract suites (solvers, guidance): noise that a sub-batch replays row for row."""


class SlicedNoise:
    """Replays full-batch noise draws, sliced to the rows a (sub-)batch holds, so a solver run on a subset of
    the batch sees exactly the noise its rows see in the full run."""

    def __init__(self, draws, rows):
        self.draws, self.rows, self.k = draws, rows, 0

    def sample(self, like):
        z = self.draws[self.k][self.rows]
        self.k += 1
        return z.to(like)
