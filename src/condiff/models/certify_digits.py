"""Certified l2 accuracy on the held-out digits under randomized smoothing (``condiff.tasks.smoothing``: Cohen et al.
2019's CERTIFY, denoised smoothing of Carlini et al. 2023, DensePure of Xiao et al. 2023, with the bundled digits
model as the denoiser in front of the digits scorer; or a one-step network of ``models.robust_digits``: rRCM of Lei
et al. 2025, or Cohen et al.'s Gaussian-augmentation classifier): the family-specific part of ``condiff certify``
and benchmarks/smoothing.py.

Units: sigma and the radii are l2 distances in [0, 1] pixel units over the 16x16 = 256 pixels (Cohen et al.'s
convention); the model and the scorer read [-1, 1], so the smoothing functions get ``scale=2, shift=-1``.
"""

from __future__ import annotations

import time

from condiff.errors import ConfigError

RADII = (0.0, 0.25, 0.5, 0.75)
SCALE, SHIFT = 2.0, -1.0  # classifier units [0, 1] -> model units [-1, 1]
BATCH = 500
NUM_CLASSES = 10


class _Counter:
    """Rows through the diffusion network (a forward pre-hook on each child of the model's module)."""

    def __init__(self, module):
        self.rows = 0
        self.handles = [c.register_forward_pre_hook(self._hook) for c in module.children()]

    def _hook(self, _module, args):
        if args:
            self.rows += int(args[0].shape[0])

    def close(self):
        for h in self.handles:
            h.remove()


ONE_STEP = ("noise", "rrcm")  # methods whose base classifier is a trained robust_digits network (no scorer)


def base_classifier(method: str, sigma: float, m=None, runs: int = 3, steps: int = 4, generator=None, classifier=None):
    """The base classifier on [0, 1] images (N, 1, 16, 16): the scorer, the scorer behind the diffusion model
    (unconditional: the null label, built for each batch's size), or (``noise``, ``rrcm``) the one-step network of
    ``classifier`` (a loaded ``models.robust_digits`` model)."""
    from condiff.data.digits import scorer
    from condiff.tasks.smoothing import DenoisedClassifier, DensePureClassifier

    if method in ONE_STEP:
        return classifier.base_classifier(sigma)
    score = scorer()

    def plain(x):
        return score.predict(SCALE * x + SHIFT)

    if method == "plain":
        return plain
    denoiser = m.denoiser

    def per_batch(x):
        cond = {"class_labels": m.family.null_raw(x.shape[0])}
        if method == "denoised":
            g = DenoisedClassifier(plain, denoiser, sigma, SCALE, SHIFT, cond)
        else:
            from condiff.solvers import DDIM

            g = DensePureClassifier(
                plain, denoiser, DDIM(eta=1.0), sigma, NUM_CLASSES, runs, steps, SCALE, SHIFT, cond, generator=generator
            )
        return g(x)

    return per_batch


def certify_images(method, sigma, n, n0, alpha, images, seed, runs=3, steps=4, m=None, classifier=None) -> dict:
    """Certify the first ``images`` held-out digits; returns the report (certificates, certified accuracy at
    ``RADII``, network evaluations per certification). ``m`` is the loaded digits model
    (``models.base.load_model``) for the denoising methods. The API behind ``condiff certify`` and
    benchmarks/smoothing.py."""
    import torch

    from condiff.data.digits import load_split
    from condiff.tasks.smoothing import certify

    if method in ONE_STEP:
        if classifier is None:
            raise ConfigError(f"method {method!r} needs a loaded robust_digits classifier")
        if classifier.config["kind"] != method:
            raise ConfigError(f"method {method!r} needs a {method} classifier, got a {classifier.config['kind']} one")
    elif method != "plain" and m is None:
        raise ConfigError(f"method {method!r} needs the loaded diffusion model m")
    split = load_split()
    x = (split["x_test"][:images] - SHIFT) / SCALE  # [0, 1] pixel units
    y = split["y_test"][:images]
    noise = torch.Generator().manual_seed(seed)
    solver_noise = torch.Generator().manual_seed((seed + 1) % 2**63)
    g = base_classifier(method, sigma, m, runs, steps, solver_noise, classifier)
    counter = _Counter(m.module) if m is not None else None
    rows = []
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for i in range(images):
                c = certify(g, x[i], sigma, n0, n, alpha, NUM_CLASSES, BATCH, noise)
                rows.append(
                    {
                        "index": i,
                        "label": int(y[i]),
                        "prediction": c.label,
                        "radius": c.radius,
                        "p_lower": c.p_lower,
                        "count": c.count,
                        "n": c.n,
                        "correct": c.label == int(y[i]),
                    }
                )
    finally:
        nfe = 0 if counter is None else counter.rows
        if counter is not None:
            counter.close()
    seconds = time.perf_counter() - t0
    accuracy = {f"{r:g}": sum(1 for row in rows if row["correct"] and row["radius"] >= r) / len(rows) for r in RADII}
    return {
        "method": method,
        "sigma": sigma,
        "n": n,
        "n0": n0,
        "alpha": alpha,
        "images": images,
        "runs": runs if method == "densepure" else None,
        "steps": steps if method == "densepure" else None,
        "seed": seed,
        "radius_units": "l2 over the 16x16 pixels in [0, 1] pixel units (model units [-1, 1]: x2)",
        "certified_accuracy": accuracy,
        "abstained": sum(1 for row in rows if row["prediction"] == -1),
        "denoiser_nfe_per_certification": nfe / images,
        "classifier_evals_per_certification": (n0 + n) * (runs if method == "densepure" else 1),
        "base_classifier": classifier.config["kind"] + " network (one step)" if method in ONE_STEP else "scorer",
        "classifier_trained_sigma": classifier.sigma if method in ONE_STEP else None,
        "seconds": seconds,
        "certificates": rows,
    }
