"""Token models for discrete diffusion: the families (``chars``: a real character corpus; ``captions``: the
procedural shapes language; ``dna``: synthetic DNA), their recipes, and a saved model (a ``TokenTransformer`` as
safetensors plus ``condiff.json``). A RADD model (``kind = "radd"``) is a time-independent logit denoiser trained
with a DCE loss (Ou et al., ICLR 2025); ``kind = "ar"`` is the autoregressive baseline of the same size;
``kind = "block"`` is BD3-LM / CtrlDiff block diffusion (a block-causal ``BlockTransformer`` trained with the block
DCE loss, sampled block by block with the clean previous blocks cached as keys and values).

Families are resolved by name here, at the edge; the discrete methods take a ``LogitDenoiser``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from condiff.core.files import atomic_dir, atomic_write_json, load_json
from condiff.data import captions, corpus, dna, shapes
from condiff.discrete import (
    KDCE,
    TDCE,
    BlockDCE,
    CachedBlockDenoiser,
    LambdaDCE,
    NetworkDenoiser,
    cdcd_loss,
    contrastive_term,
    inter_negatives,
    intra_negatives,
    mask_id,
    one_hot,
    with_contrastive,
)
from condiff.errors import ConfigError, InputFileError, one_of
from condiff.models.family import load_pretrained
from condiff.nets.block_transformer import BlockTransformer
from condiff.nets.token_classifier import BagOfTokens
from condiff.nets.token_transformer import TokenTransformer
from condiff.training.recipe import (
    ObjectiveConfig,
    TrainConfig,
    check_keys,
    check_name,
    check_objective_train,
    check_real,
    typed_table,
)

LOSSES = {"lambda_dce": LambdaDCE, "k_dce": KDCE, "t_dce": TDCE}
KINDS = ("radd", "ar", "block")
CONTRASTIVE_KINDS = ("inter", "intra")


# families -------------------------------------------------------------------------------------------------------
class TokenFamily:
    name = "?"
    vocab_size = 0
    cond_slots = 0
    cond_vocab = 1

    def length(self, data) -> int:
        return data.length

    def batch(self, n: int, generator, data) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens (n, L), condition (n, cond_slots) or None) for training."""
        raise NotImplementedError

    def text(self, tokens: torch.Tensor) -> list[str]:
        raise NotImplementedError

    def encode(self, prompt: str) -> torch.Tensor:
        """A prompt as the text's first tokens."""
        raise ConfigError(f"a {self.name} model takes no text prefix")


class Chars(TokenFamily):
    """Characters of Python's bundled language-reference topics (``condiff.data.corpus``)."""

    name = "chars"

    def __init__(self):
        self.corpus = corpus.load()
        self.vocab_size = self.corpus.V

    def batch(self, n, generator, data):
        return corpus.windows(self.corpus.train, data.length, n, generator), None

    def text(self, tokens):
        return [self.corpus.decode(row) for row in tokens]

    def encode(self, prompt: str) -> torch.Tensor:
        return self.corpus.encode(corpus.normalise(prompt))


class Captions(TokenFamily):
    """Captions of the shapes world (``condiff.data.captions``), conditioned on the attributes they name:
    cond (n, 4) holds shape, colour, size, position ids, with ``NULL`` for an attribute the caption omits."""

    name = "captions"
    vocab_size = captions.VOCAB.V
    cond_slots = 4
    NULL = max(len(v) for v in shapes.ATTRIBUTES.values())
    cond_vocab = NULL + 1

    def length(self, data):
        return captions.SEQ_LEN

    def batch(self, n, generator, data):
        attrs = shapes.random_attrs(n, generator)
        tokens, keep = captions.generate(attrs, generator, p_drop=data.p_drop)
        keep = keep & (torch.rand(n, 1, generator=generator) >= data.cond_drop)
        return tokens, torch.where(keep, attrs, torch.full_like(attrs, self.NULL))

    def text(self, tokens):
        return captions.text(tokens)


class Dna(TokenFamily):
    """DNA (``condiff.data.dna``): background from a known Markov chain, and with ``data.promoter_share`` > 0 that
    share of rare motif-bearing promoters."""

    name = "dna"
    vocab_size = dna.V

    def batch(self, n, generator, data):
        return dna.dataset(n, data.length, generator, data.promoter_share), None

    def text(self, tokens):
        return [dna.decode(row) for row in tokens]

    def encode(self, prompt: str) -> torch.Tensor:
        return dna.encode(prompt)


FAMILIES = {"chars": Chars, "captions": Captions, "dna": Dna}


def get_family(name: str) -> TokenFamily:
    if name not in FAMILIES:
        raise one_of("token family", name, FAMILIES)
    return FAMILIES[name]()


# recipes --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetConfig:
    kind: str = "radd"
    block_size: int = 4  # kind "block": tokens per block
    dim: int = 128
    layers: int = 4
    heads: int = 4


@dataclass(frozen=True)
class DataConfig:
    length: int = 128
    p_drop: float = 0.0  # captions: each attribute left out of the text and the condition
    cond_drop: float = (
        0.0  # captions: the whole condition null (the text still names its attributes); 1 = unconditional
    )
    promoter_share: float = 0.0  # dna: the share of motif-bearing promoters among the background sequences


@dataclass(frozen=True)
class ContrastiveConfig:
    """CDCD's contrastive term (Zhu et al., ICLR 2023): weight lambda (0 = off), negatives per sample, their kind
    ("inter": other samples of the batch; "intra": the sample with a fraction ``corrupt`` of its tokens changed)."""

    weight: float = 0.0
    negatives: int = 8
    kind: str = "inter"
    corrupt: float = 0.25


@dataclass(frozen=True)
class TokenRecipe:
    name: str
    family: str
    loss: str = "lambda_dce"
    model: NetConfig = field(default_factory=NetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # unused: the Trainer's field

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("objective")
        return d


def token_recipe_from_dict(data: dict) -> TokenRecipe:
    check_keys(data, {"name", "family", "loss", "model", "data", "train", "contrastive"}, what="token recipe")
    r = TokenRecipe(
        data["name"],
        data["family"],
        data.get("loss", "lambda_dce"),
        typed_table(NetConfig, data.get("model", {}), "model"),
        typed_table(DataConfig, data.get("data", {}), "data"),
        typed_table(TrainConfig, data.get("train", {}), "train"),
        typed_table(ContrastiveConfig, data.get("contrastive", {}), "contrastive"),
    )
    check_name(r.name)
    if r.family not in FAMILIES:
        raise one_of("family", r.family, FAMILIES)
    if not isinstance(r.loss, str) or r.loss not in LOSSES:
        raise one_of("loss", r.loss, LOSSES)
    if r.model.kind not in KINDS:
        raise one_of("model.kind", r.model.kind, KINDS)
    for key in ("dim", "layers", "heads"):
        check_real(f"model.{key}", getattr(r.model, key), 1, 4096)
    if r.model.dim % r.model.heads:
        raise ConfigError(f"model.dim {r.model.dim} must be a multiple of model.heads {r.model.heads}")
    check_real("data.length", r.data.length, 1, 4096)
    length = captions.SEQ_LEN if r.family == "captions" else r.data.length
    if r.model.kind == "block" and (r.model.block_size < 1 or length % r.model.block_size):
        raise ConfigError(f"model.block_size {r.model.block_size} must divide the sequence length {length}")
    check_real("data.p_drop", r.data.p_drop, 0, 1)
    check_real("data.cond_drop", r.data.cond_drop, 0, 1)
    check_real("data.promoter_share", r.data.promoter_share, 0, 1)
    if r.data.promoter_share and r.family != "dna":
        raise ConfigError(f"data.promoter_share is a dna recipe's key; family {r.family!r} takes none")
    check_objective_train(ObjectiveConfig(), r.train)
    c = r.contrastive
    check_real("contrastive.weight", c.weight, 0, 1e6)
    check_real("contrastive.negatives", c.negatives, 1, 4096)
    check_real("contrastive.corrupt", c.corrupt, 0, 1, lo_open=True)
    if c.kind not in CONTRASTIVE_KINDS:
        raise one_of("contrastive.kind", c.kind, CONTRASTIVE_KINDS)
    if c.weight > 0 and c.kind == "inter" and c.negatives > r.train.batch_size - 1:
        raise ConfigError(
            f"contrastive.negatives {c.negatives} needs train.batch_size > it (inter negatives are other samples of "
            f"the batch), got batch_size {r.train.batch_size}"
        )
    if c.weight > 0 and r.model.kind == "ar":
        raise ConfigError("contrastive.weight > 0 needs a diffusion model.kind (CDCD scores the diffusion model)")
    return r


# the model ------------------------------------------------------------------------------------------------------
@dataclass
class TokenModel:
    family: TokenFamily
    module: nn.ModuleDict
    config: dict  # {"family", "kind", "length", ...}
    path: Path | None = None
    info: dict = field(default_factory=dict)

    @property
    def net(self) -> TokenTransformer:
        return self.module["net"]

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def length(self) -> int:
        return self.config["length"]

    @property
    def denoiser(self) -> NetworkDenoiser:
        if self.kind == "ar":
            raise ConfigError(f"{self.config['family']} model of kind {self.kind!r} is not a diffusion denoiser")
        if self.kind == "block":
            return CachedBlockDenoiser(self.net, self.family.vocab_size)
        return NetworkDenoiser(self.net, self.family.vocab_size)

    @property
    def block_size(self) -> int:
        return self.net.config.block_size if self.kind == "block" else self.length

    def save(self, directory, extra: dict | None = None):
        with atomic_dir(Path(directory)) as tmp:
            self.net.save_pretrained(tmp / "net")
            atomic_write_json(tmp / "condiff.json", {"tokens": self.config, **(extra or {})})


def build_token_model(r: TokenRecipe) -> TokenModel:
    fam = get_family(r.family)
    length = fam.length(r.data)
    common = dict(
        vocab_size=fam.vocab_size,
        length=length,
        dim=r.model.dim,
        layers=r.model.layers,
        heads=r.model.heads,
        cond_slots=fam.cond_slots,
        cond_vocab=fam.cond_vocab,
    )
    if r.model.kind == "block":
        net = BlockTransformer(block_size=r.model.block_size, **common)
    else:
        net = TokenTransformer(causal=r.model.kind == "ar", **common)
    cfg = {"family": fam.name, "kind": r.model.kind, "length": length}
    if r.data.promoter_share:
        cfg["promoter_share"] = r.data.promoter_share
    return TokenModel(fam, nn.ModuleDict({"net": net}), cfg)


def is_token_model(directory) -> bool:
    """Whether ``directory`` holds a token model (its condiff.json has a "tokens" table); an unreadable file is
    left to the image loader's error."""
    f = Path(directory) / "condiff.json"
    try:
        info = load_json(f) if f.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "tokens" in info


def load_token_model(directory, what: str = "--model") -> TokenModel:
    directory = Path(directory)
    if not is_token_model(directory):
        raise InputFileError(f"{what} {str(directory)!r} is not a token model folder (no condiff.json with 'tokens')")
    info = load_json(directory / "condiff.json")
    cfg = info["tokens"]
    ok = isinstance(cfg, dict) and cfg.get("family") in FAMILIES and cfg.get("kind") in KINDS
    if not ok or not isinstance(cfg.get("length"), int) or isinstance(cfg.get("length"), bool):
        raise InputFileError(
            f"{what} {str(directory)!r}: condiff.json's 'tokens' must name a family ({', '.join(FAMILIES)}), a kind "
            f"({', '.join(KINDS)}) and an integer length, got {cfg!r}"[:300]
        )
    share = cfg.get("promoter_share", 0.0)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise InputFileError(
            f"{what} {str(directory)!r}: condiff.json's 'tokens' promoter_share must be a number in [0, 1], got "
            f"{share!r}"[:300]
        )
    net = load_pretrained(BlockTransformer if cfg["kind"] == "block" else TokenTransformer, directory / "net", what)
    return TokenModel(get_family(cfg["family"]), nn.ModuleDict({"net": net.eval()}), cfg, directory, info)


# training and likelihoods ---------------------------------------------------------------------------------------
def ar_nll(net: TokenTransformer, x0: torch.Tensor, cond=None) -> torch.Tensor:
    """Per-sample -log p(x_0) of the autoregressive baseline (exact), in nats."""
    logp = torch.log_softmax(net(one_hot(x0, net.config.vocab_size), cond).float(), -1)
    return -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1).sum(-1)


def token_loss_fn(model: TokenModel, r: TokenRecipe):
    """The Trainer's loss: nats per token of the recipe's DCE loss (RADD) or the exact NLL (AR)."""
    loss = BlockDCE(r.model.block_size) if r.model.kind == "block" else LOSSES[r.loss]()
    c = r.contrastive

    def fn(step, g):
        x0, cond = model.family.batch(r.train.batch_size, g, r.data)
        if model.kind == "ar":
            per = ar_nll(model.net, x0, cond)
            return per.mean() / x0.shape[1], {}
        den = model.denoiser
        per = loss(den, x0, g, cond)
        if c.weight == 0:
            return per.mean() / x0.shape[1], {}
        contrast = contrastive_loss(den, x0, cond, c, g)
        return with_contrastive(per, contrast, c.weight).mean() / x0.shape[1], {
            "contrastive": float(contrast.detach().mean())
        }

    return fn


def contrastive_loss(den, x0, cond, c: ContrastiveConfig, g) -> torch.Tensor:
    """CDCD's InfoNCE term per sample on a lambda-masked x_t (lambda stratified over the batch, as lambda-DCE)."""
    b = x0.shape[0]
    lam = (torch.rand(b, generator=g, dtype=torch.float64) + torch.arange(b)) / b
    masked = torch.rand(x0.shape, generator=g, dtype=torch.float64) < lam[:, None]
    x_t = torch.where(masked, torch.full_like(x0, mask_id(den.vocab_size)), x0)
    if c.kind == "inter":
        neg = inter_negatives(x0, c.negatives, g)
    else:
        neg = intra_negatives(x0, c.negatives, den.vocab_size, g, c.corrupt)
    pos, negs = contrastive_term(den, x0, x_t, cond, neg)
    return cdcd_loss(pos, negs)


@torch.no_grad()
def bits_per_token(model: TokenModel, data: torch.Tensor, cond=None, draws: int = 8, seed: int = 0, batch=256) -> dict:
    """Bits per token on ``data`` (n, L): exact for AR; for RADD the k-DCE upper bound on -log p (Ou et al., Thm. 2),
    for block diffusion the block DCE bound, averaged over ``draws`` mask draws per sequence, with its standard
    error."""
    g = torch.Generator().manual_seed(seed)
    per = []
    for i in range(0, len(data), batch):
        x0 = data[i : i + batch]
        c = None if cond is None else cond[i : i + batch]
        if model.kind == "ar":
            per.append(ar_nll(model.net, x0, c))
        else:
            den, bound = model.denoiser, BlockDCE(model.block_size) if model.kind == "block" else KDCE()
            per.append(torch.stack([bound(den, x0, g, c) for _ in range(draws)]).mean(0))
    per = torch.cat(per).double() / data.shape[1] / math.log(2)
    return {"bits": float(per.mean()), "se": float(per.std() / math.sqrt(len(per)))}


# captions: attributes read back, and guidance towards one ---------------------------------------------------------
def attribute_of(name: str) -> tuple[int, int]:
    """'color=red' -> (attribute column, value id) in shapes.random_attrs order."""
    key, _, value = name.partition("=")
    names = list(shapes.ATTRIBUTES)
    if key not in shapes.ATTRIBUTES or value not in shapes.ATTRIBUTES[key]:
        accepted = ", ".join(f"{k}={v}" for k in names for v in shapes.ATTRIBUTES[k][:2])
        raise ConfigError(f"attribute {name!r} is not accepted; write NAME=VALUE, e.g. {accepted}, ...")
    return names.index(key), shapes.ATTRIBUTES[key].index(value)


def fit_attribute_classifier(attribute: int, value: int, p_drop: float, steps: int = 400, seed: int = 0):
    """A noisy classifier p(attribute = value | x_t) on captions (attributes left out with ``p_drop``, as the model
    saw them) masked at a uniform random rate, fitted by logistic regression (Adam)."""
    g = torch.Generator().manual_seed(seed)
    clf = BagOfTokens(captions.VOCAB.V)
    opt = torch.optim.Adam(clf.parameters(), lr=0.05)
    with torch.enable_grad():  # also when called under no_grad (sampling code)
        _fit(clf, opt, attribute, value, p_drop, steps, g)
    return clf.eval().requires_grad_(False)


def _fit(clf, opt, attribute, value, p_drop, steps, g):
    for _ in range(steps):
        attrs = shapes.random_attrs(256, g)
        tokens, _ = captions.generate(attrs, g, p_drop=p_drop)
        masked = torch.rand(tokens.shape, generator=g) < torch.rand(256, 1, generator=g)
        x = torch.where(masked, torch.full_like(tokens, captions.VOCAB.V), tokens)
        y = (attrs[:, attribute] == value).float()
        loss = nn.functional.binary_cross_entropy_with_logits(clf(one_hot(x, captions.VOCAB.V)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
