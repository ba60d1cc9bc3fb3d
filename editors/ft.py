"""Fine-tuning baselines: ``ft`` (FT-L / FT-M) and ``ft-c`` (L∞-constrained fine-tuning, "FT+L").

Both optimise one kind of weight matrix at a few layers with Adam on the edit prompts, then return the change
``delta = W_trained - W0`` and put ``W0`` back bit for bit (the model is trained in place, never left changed).

* ``ft``: the EasyEdit naming. FT-L (``objective="prompt_last"``) is the loss of kmeng01/rome
  ``baselines/ft/ft_main.py``: the log-softmax at the LAST prompt token, gathered at every target id (so a multi-token
  target is predicted in full from a single position; a quirk kept for comparability). FT-M
  (``objective="target_new"``, EasyEdit ``objective_optimization: target_new``) is teacher-forced cross-entropy on
  ``prompt + " " + target_new``, masked to the target tokens. An optional L∞ box (``norm_constraint``) is offered as
  in rome's and EasyEdit's FT hparams.
* ``ft-c``: constrained fine-tuning of Zhu et al. 2020 ("Modifying Memories in Transformer Models"), the "FT+L"
  baseline of the ROME paper: after every Adam step each edited weight is clamped elementwise into
  ``[W0 - epsilon, W0 + epsilon]``, so ``max |delta| <= epsilon`` always holds.

The loop (:func:`editors.finetune.finetune`, with the box for ``ft-c``), the loss and the editor are the fine-tuning
family's (:class:`editors.finetune.FineTuneEditor`); this module holds the two configs and registers the methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base import EditorConfig
from .fields import check_range
from .finetune import FineTuneConfig, FineTuneEditor
from .registry import register


@dataclass
class FTConfig(FineTuneConfig):
    """Config of ``ft``: plain fine-tuning of the chosen weights (FT-L or FT-M by ``objective``).

    Defaults follow EasyEdit hparams/FT/llama3.2-3b.yaml (25 steps, lr 5e-4, batch 1, no norm constraint) with the
    layer mapped to SmolLM2-135M. The objective defaults to FT-M ('target_new'), which trains every target token at
    its own position, i.e. what teacher-forced reliability scores; set 'prompt_last' for rome's FT-L. (For a
    single-token target the two objectives are the same loss.)
    """

    version: ClassVar[int] = 1

    norm_constraint: float | None = field(default=None, metadata={"help": (
        "Optional L∞ box: after every step clamp each trained weight into [W0 - c, W0 + c] (rome ft_main "
        "'norm_constraint'). None or 0 = off (EasyEdit Llama FT hparams: false). For the constrained baseline as a "
        "method of its own, use 'ft-c'.")})

    def validate(self) -> None:
        super().validate()
        check_range("norm_constraint", self.norm_constraint, 0, optional=True)

    def box(self) -> float | None:
        return float(self.norm_constraint) if self.norm_constraint else None


@dataclass
class FTCConfig(FineTuneConfig):
    """Config of ``ft-c``: fine-tuning inside an L∞ box around the original weights (Zhu et al. 2020, ROME's FT+L).

    rome hparams/FT/gpt2-xl_constr.json: layer 0, 25 steps, lr 5e-4, epsilon 5e-4 (lr = epsilon). Kept here: layer 0,
    25 steps, lr = epsilon. Changed: epsilon 2e-3, because 5e-4 is too tight on SmolLM2-135M (docs/DEFAULTS.md).
    Zhu et al. fine-tune with the ordinary LM loss on the new fact, which is the 'target_new' objective (the default
    here); rome's FT+L used 'prompt_last'.
    """

    version: ClassVar[int] = 1

    layers: tuple[int, ...] = field(default=(0,), metadata={"help": (
        "Decoder layers whose weights are fine-tuned (0-based). Layer 0 as rome's FT+L (hparams/FT/"
        "gpt2-xl_constr.json). An early layer needs a smaller box than a late one for the same edit, but each step "
        "costs more (the backward pass runs through every layer); docs/DEFAULTS.md.")})
    lr: float = field(default=2e-3, metadata={"help": (
        "Adam learning rate. Equal to epsilon as in rome's gpt2-xl_constr (both 5e-4): Adam moves each entry by "
        "about lr per step, so entries reach the faces of the box in a step or two and the budget is used.")})
    epsilon: float = field(default=2e-3, metadata={"help": (
        "Half-width of the elementwise (L∞) box: after every Adam step W is clamped into [W0 - epsilon, "
        "W0 + epsilon] (Zhu et al. 2020; rome gpt2-xl_constr 5e-4, gpt-j 5e-5). 2e-3 on SmolLM2-135M: it gives "
        "the same Frobenius budget as rome's GPT-2 XL setting (epsilon * sqrt(#entries): 2e-3 * sqrt(1536*576) = "
        "1.9 vs 5e-4 * sqrt(6400*1600) = 1.6), ~1.3% of a typical |W| entry (0.15); smaller boxes: "
        "docs/DEFAULTS.md.")})

    def validate(self) -> None:
        super().validate()
        check_range("epsilon", self.epsilon, 0, lo_open=True, note="the constraint is what makes this ft-c")

    def box(self) -> float | None:
        return float(self.epsilon)



@register(family="fine-tuning", order=20, tiny={"layers": (1,), "num_steps": 3})
class FTEditor(FineTuneEditor):
    """Plain fine-tuning: FT-L (rome's last-prompt-token loss) or FT-M (teacher-forced target loss)."""

    name: ClassVar[str] = "ft"
    config_cls: ClassVar[type[EditorConfig]] = FTConfig
    summary: ClassVar[str] = "Fine-tuning of one weight per layer (FT-L / FT-M by 'objective'); Adam, 25 epochs"


@register(family="fine-tuning", order=30, tiny={"layers": (1,), "num_steps": 3, "batch_size": 2})
class FTCEditor(FineTuneEditor):
    """Constrained fine-tuning (Zhu et al. 2020; ROME's FT+L): W stays in an L∞ box of half-width epsilon."""

    name: ClassVar[str] = "ft-c"
    config_cls: ClassVar[type[EditorConfig]] = FTCConfig
    summary: ClassVar[str] = "L∞-constrained fine-tuning (Zhu et al. 2020, FT+L): W clamped into W0 ± epsilon"
