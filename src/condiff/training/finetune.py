"""Fine-tuning with the Trainer: an adaptation method (which weights train) times an objective (what they are
trained for), each an object the Trainer calls, so every combination runs with the Trainer's EMA, atomic
checkpoints, exact resume and progress bar.

Methods (the Trainer's ``adaptation``): ``Full`` (every weight), ``Lora`` (peft adapters on the denoising network:
Hu et al. 2022), ``Sara`` (the smallest weights, sparse, with the nuclear-norm penalty and re-selection at K_p:
Hu et al. 2025, sec. 3). Each prepares a model, runs before every step (SaRA's re-selection), rebuilds a
checkpoint's structure on resume, folds itself into plain networks for export, and saves its own small file
(LoRA: diffusers' format; SaRA: the selected values and theta).

Objectives (the Trainer's ``loss_fn``): ``Denoise`` (the family's denoising loss on new data, the SFT baseline
on preference winners), ``DPO`` (Wallace et al. 2024, eq. 14: winner and loser noised with one t and one noise,
against a frozen reference), ``DomainStudio`` (Zhu et al. 2023, sec. 3: the simple loss plus relative-distance
preservation against the frozen source model, on x0 estimates and on their Haar high frequencies, and the
high-frequency MSE to the target images).

Data objects give ``batch(step, n, generator, loss_cfg) -> (x0, raw conditions)``; preference pairs are
``PreferencePairs``. Both are built where the program starts (the data are a model family's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from condiff.core.denoiser import coefficients
from condiff.errors import ConfigError
from condiff.training import lora as lora_lib
from condiff.training import sara as sara_lib
from condiff.training.domainstudio import hf_mse, high_frequency, relative_distance_kl
from condiff.training.dpo import dpo_loss
from condiff.training.objectives import UniformTime


def effective_state(module: torch.nn.Module, keys) -> dict[str, torch.Tensor]:
    """The values of ``keys`` (a plain network's state-dict names) as ``module`` computes them: through a SaRA
    parametrization, or from a peft layer's wrapped base layer (merge the adapters first)."""
    out = {}
    for key in keys:
        path, _, name = key.rpartition(".")
        mod = module.get_submodule(path) if path else module
        base = getattr(mod, "base_layer", None)
        out[key] = getattr(base if base is not None else mod, name).detach().clone()
    return out


def plain_copy(model, module: torch.nn.Module) -> torch.nn.Module:
    """Fresh networks of ``model``'s family holding ``module``'s effective weights (adapters folded in)."""
    fresh = model.family.build(model.model_cfg)
    fresh.load_state_dict(effective_state(module, fresh.state_dict().keys()))
    return fresh


def trainable_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter state tensors (Adam: both moments and the step counts)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


# methods -----------------------------------------------------------------------------------------------
class Full:
    """Every weight of the model trains."""

    name = "full"

    def prepare(self, model) -> int:
        for p in model.module.parameters():
            p.requires_grad_(True)
        return trainable_count(model.module)

    def before_step(self, trainer) -> None:
        pass

    def penalty(self, module, generator) -> torch.Tensor:
        return torch.zeros(())

    def restore_structure(self, trainer, weights) -> None:
        pass

    def plain(self, model, module):
        return module

    def save(self, module, directory) -> list[str]:
        return []


@dataclass(frozen=True)
class Lora(Full):
    """A peft LoRA adapter on the denoising network ``unet``; everything else frozen."""

    rank: int = 3
    alpha: float = 3.0
    name = "lora"

    def prepare(self, model) -> int:
        for p in model.module.parameters():
            p.requires_grad_(False)
        lora_lib.add_lora(model.module["unet"], self.rank, self.alpha)
        return trainable_count(model.module)

    def plain(self, model, module):
        with lora_lib.merged(module["unet"]):
            return plain_copy(model, module)

    def save(self, module, directory) -> list[str]:
        lora_lib.save_lora(module["unet"], directory / "lora")
        return ["lora"]


@dataclass(frozen=True)
class Sara(Full):
    """SaRA on the denoising network ``unet``: the entries below ``theta`` train, the nuclear-norm penalty of one
    random update matrix per step (``lambda_rank``; matrices whose smaller side exceeds ``min_dim``: 64 in the paper,
    for Stable Diffusion's widths), the mask recomputed before step ``reselect_at`` (0: never)."""

    theta: float = 2e-3
    lambda_rank: float = 5e-4
    reselect_at: int = 0
    min_dim: int = 32
    name = "sara"

    def prepare(self, model) -> int:
        for p in model.module.parameters():
            p.requires_grad_(False)
        return sara_lib.apply_sara(model.module["unet"], self.theta)

    def before_step(self, trainer) -> None:
        if self.reselect_at and trainer.step == self.reselect_at:
            sara_lib.reselect(trainer.module["unet"])
            trainer.rebuild_optimizer()

    def penalty(self, module, generator) -> torch.Tensor:
        return sara_lib.nuclear_penalty(module["unet"], self.lambda_rank, generator, self.min_dim)

    def restore_structure(self, trainer, weights) -> None:
        sara_lib.restructure(trainer.module["unet"], weights, prefix="unet.")
        trainer.rebuild_optimizer()

    def plain(self, model, module):
        # not remove_parametrizations: a deep copy shares its parametrized class with the original, and removing
        # the parametrization deletes the property from that class, breaking the original too
        return plain_copy(model, module)

    def save(self, module, directory) -> list[str]:
        from condiff.core.files import atomic_write_json, save_tensors

        save_tensors(directory / "sara.safetensors", sara_lib.state_dict_of(module["unet"]))
        atomic_write_json(directory / "sara.json", {"theta": self.theta, "network": "unet"})
        return ["sara.safetensors", "sara.json"]


# objectives --------------------------------------------------------------------------------------------
def x0_estimates(model, modules, x0, raw, t, eps) -> list[torch.Tensor]:
    """x0 predicted by each of ``modules`` (networks of ``model``'s family) from x_t = a x0 + s eps at times ``t``."""
    fam, pred, sch = model.family, model.prediction, model.schedule
    a, s = coefficients(sch, t, x0)
    x_t = a * x0 + s * eps
    x_in, t_in = pred.precondition(x_t, t, a, s, sch)
    out = []
    for module in modules:
        cond = fam.encode(module, raw)
        net = fam.forward(module, model.model_cfg, x_in, t_in.to(x0.dtype), cond)
        out.append(pred.to_x0(net, x_t, a, s, t, sch))
    return out


@dataclass
class Denoise:
    """The family's denoising loss on ``data``'s batches."""

    model: object
    data: object
    loss_cfg: object
    batch_size: int

    def __call__(self, step: int, generator: torch.Generator):
        m = self.model
        x0, raw = self.data.batch(step, self.batch_size, generator, self.loss_cfg)
        loss = m.family.loss(m.module, m.model_cfg, m.schedule, self.loss_cfg, x0, raw, generator)
        return loss.mean(), {}


@dataclass
class PreferencePairs:
    """Preference data: per row a raw condition, the preferred image and the other one."""

    raw: torch.Tensor
    winners: torch.Tensor
    losers: torch.Tensor

    def __post_init__(self):
        n = self.raw.shape[0]
        if n == 0 or self.winners.shape != self.losers.shape or self.winners.shape[0] != n:
            raise ConfigError(
                f"preference pairs need one raw condition per (winner, loser), at least one, got {n} conditions, "
                f"winners {tuple(self.winners.shape)}, losers {tuple(self.losers.shape)}"
            )

    def batch(self, step, n, generator, loss_cfg):
        """The winners alone (the SFT baseline's data)."""
        idx = torch.randint(self.raw.shape[0], (n,), generator=generator)
        return self.winners[idx], self.raw[idx]


@dataclass
class DPO:
    """Diffusion-DPO against the frozen ``reference`` networks; logs the implicit accuracy and both errors."""

    model: object
    reference: torch.nn.Module
    pairs: PreferencePairs
    beta: float
    loss_cfg: object
    batch_size: int

    def __call__(self, step: int, generator: torch.Generator):
        m, p = self.model, self.pairs
        idx = torch.randint(p.raw.shape[0], (self.batch_size,), generator=generator)
        raw, xw, xl = p.raw[idx], p.winners[idx], p.losers[idx]
        state = generator.get_state()

        def errors(module):
            out = []
            for x in (xw, xl):  # the same t, noise and condition dropout for the winner and the loser
                generator.set_state(state)
                out.append(m.family.loss(module, m.model_cfg, m.schedule, self.loss_cfg, x, raw, generator))
            return out

        ew, el = errors(m.module)
        with torch.no_grad():
            rw, rl = errors(self.reference)
        terms = dpo_loss(ew.float(), el.float(), rw.float(), rl.float(), self.beta)
        metrics = {
            "implicit_accuracy": terms.implicit_accuracy,
            "model_error": terms.model_error,
            "reference_error": terms.reference_error,
        }
        return terms.loss, metrics


@dataclass
class DomainStudio:
    """The simple loss on the few-shot ``data`` plus DomainStudio's losses against the frozen ``source``."""

    model: object
    source: torch.nn.Module
    data: object
    lambda_img: float
    lambda_hf: float
    lambda_hfmse: float
    loss_cfg: object
    batch_size: int

    def __call__(self, step: int, generator: torch.Generator):
        m = self.model
        x0, raw = self.data.batch(step, self.batch_size, generator, self.loss_cfg)
        simple = m.family.loss(m.module, m.model_cfg, m.schedule, self.loss_cfg, x0, raw, generator).mean()
        t = UniformTime().sample(m.schedule, x0.shape[0], generator)
        eps = torch.randn(x0.shape, generator=generator)
        (adapted,) = x0_estimates(m, [m.module], x0, raw, t, eps)
        with torch.no_grad():
            (source,) = x0_estimates(m, [self.source], x0, raw, t, eps)
        l_img = relative_distance_kl(adapted, source)
        l_hf = relative_distance_kl(high_frequency(adapted), high_frequency(source))
        l_hfmse = hf_mse(adapted, x0)
        loss = simple + self.lambda_img * l_img + self.lambda_hf * l_hf + self.lambda_hfmse * l_hfmse
        terms = {"simple": simple, "img": l_img, "hf": l_hf, "hfmse": l_hfmse}
        return loss, {k: float(v.detach()) for k, v in terms.items()}


def with_penalty(objective, method, module):
    """``objective``'s loss plus the method's regulariser (SaRA's nuclear norm), drawn after the objective's
    randomness from the same step generator."""

    def loss_fn(step, generator):
        loss, metrics = objective(step, generator)
        extra = method.penalty(module, generator)
        if extra.requires_grad:
            metrics = {**metrics, "penalty": float(extra.detach())}
        return loss + extra, metrics

    return loss_fn
