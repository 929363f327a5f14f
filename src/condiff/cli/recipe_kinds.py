"""Recipe families that are neither image families nor token families: each names the module that reads its
recipe (``from_dict``) and builds its Trainer (``make_trainer``). Imported lazily, so a family's heavy imports are
paid only when its recipe is used. A new family adds one ``RecipeKind`` line here."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class RecipeKind:
    family: str
    module: str  # the condiff module that holds the two functions below
    from_dict: str  # (dict) -> recipe, raising ConfigError on a bad value
    make_trainer: str  # (recipe, out_dir, progress) -> Trainer

    def read(self, data: dict):
        return getattr(importlib.import_module(self.module), self.from_dict)(data)

    def trainer(self, recipe, out_dir, progress: bool = True):
        return getattr(importlib.import_module(self.module), self.make_trainer)(recipe, out_dir, progress)


KINDS = {
    k.family: k
    for k in (
        RecipeKind("seq2seq", "condiff.models.seq2seq", "seq2seq_recipe_from_dict", "make_seq2seq_trainer"),
        RecipeKind("diffmatch", "condiff.models.diffmatch", "diffmatch_recipe_from_dict", "make_diffmatch_trainer"),
        RecipeKind("dense", "condiff.models.dense", "dense_recipe_from_dict", "make_dense_trainer"),
        RecipeKind("unicon", "condiff.models.unicon", "unicon_recipe_from_dict", "make_unicon_trainer"),
        RecipeKind("robust_digits", "condiff.models.robust_digits", "robust_recipe_from_dict", "make_robust_trainer"),
        RecipeKind("diffusevae", "condiff.models.diffusevae", "diffusevae_recipe_from_dict", "make_diffusevae_trainer"),
        RecipeKind("tsdiff", "condiff.models.tsdiff_series", "tsdiff_recipe_from_dict", "make_tsdiff_trainer"),
        RecipeKind("rddm", "condiff.models.rddm_restore", "rddm_recipe_from_dict", "make_rddm_trainer"),
        RecipeKind("sr", "condiff.models.sr", "sr_recipe_from_dict", "make_sr_trainer"),
        RecipeKind("dit_moe", "condiff.models.dit_moe", "dit_recipe_from_dict", "make_dit_trainer"),
    )
}


def kind_of(recipe) -> RecipeKind | None:
    """The registered kind of a recipe object (by its ``family``), or None for image and token recipes."""
    family = getattr(recipe, "family", None)
    return KINDS.get(family) if isinstance(family, str) else None
