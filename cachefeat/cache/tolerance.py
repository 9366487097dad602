"""How close the cached path must be to live frozen inference: the one tolerance table.

`cachefeat verify` (cache/verify.py) and the equivalence tests (tests/test_equivalence.py)
both read it. The rule, element-wise: |cached - live| <= rtol * |live| + atol * max|live of
that field| (`Tolerance`, `Tolerance.atol_for`); rtol = atol = 0 means exact.

- integer and bool fields, raw hit features and targets (float32 copies): exact.
- float32 embeddings and logits: rtol 1e-5, atol 1e-5 of the field's largest magnitude. Two
  batch compositions differ by summation order only (padding changes the shapes the kernels
  see), and such differences scale with the magnitude of the values summed, not with each
  element, so a pure rtol cannot express float32 rounding here. Measured worst max|cached -
  live| / max|live| on this CPU (cached events of the test caches, extracted in batches of 24,
  against live batches of 1, 3, 7, 16, 24, 37, 64, 100 and all 160 events, 4 draws each):
  muon backbone hit_embed 1.6e-6, query_embed 8.4e-7, query_valid_logit 3.9e-7, pair_logit
  4.9e-6; hepattn MaskFormer 2.8e-7, 4.1e-7, 2.2e-6, 5.0e-7 (verify's earlier measurement,
  160 events at batch sizes 64, 21 and 1: 4.6e-6, pair logits). 1e-5 is twice the worst;
  verify used 5e-5 and the tests 1e-5, without a measurement behind the larger value.
- float16 / bfloat16 embeddings: one unit in the last place of the storage dtype on top
  (rtol 2^-10 resp. 2^-7). Logits are stored as float32 whatever the embedding dtype.
- head loss: rtol 1e-5; head gradients: the 2-norm of the difference over all parameters
  within 1e-5 of the gradient's 2-norm (measured on the batches above, dropout 0.2: loss
  1.1e-7, gradients 1.5e-6 in the norm). Element-wise checks do not hold in general: where a
  ReLU input or a max/min pool sits within rounding of a tie, the two sources take different
  branches and a gradient element moves by a whole term (measured on an H100: 7.3e-5 of a
  parameter's largest gradient, at 2.1e-6 in the norm; 18 samples of 256 events at batch
  sizes 64, 7 and 1). The equivalence tests' fixed batches have no such tie and also check
  element-wise, within GRAD_ELEMENT_ATOL (measured: 4.3e-7 needed on top of rtol 1e-5).
  For float16/bfloat16 caches the live reference has its embeddings rounded to the storage
  dtype, as extraction stores them, and the rtol grows by one storage ulp (live values on a
  rounding boundary may round the other way; measured: 0.03 unit roundoffs, float16). The
  rounding itself moves the gradients by up to ~8 unit roundoffs of their norm (measured),
  the documented price of the dtype.
- caches extracted under bf16 autocast (`precision: bf16`): every float field gets 2^-4 of its
  magnitude on top (and the head's rtol too), since the live forward runs in bfloat16 as well
  (measured on 20 muon events, CPU: pair logits 1.6e-2 of their magnitude apart).
"""

from __future__ import annotations

import dataclasses

import torch

from cachefeat.errors import UserError

EXACT_FIELDS = (
    "event_id", "hit_offsets", "query_offsets", "query_slot", "target_index", "target_valid",
    "pair_query", "pair_hit", "hit_raw", "targets",
)
EMBED_FIELDS = ("hit_embed", "query_embed")
LOGIT_FIELDS = ("query_valid_logit", "pair_logit")
FIELDS = EXACT_FIELDS + EMBED_FIELDS + LOGIT_FIELDS

F32_RTOL = 1e-5
F32_ATOL = 1e-5  # of the field's largest magnitude
HEAD_RTOL = 1e-5  # loss; gradients in the 2-norm over all parameters
# Element-wise gradient check of the equivalence tests: of max(1, the parameter's largest gradient).
GRAD_ELEMENT_ATOL = 1e-6
STORAGE_ULP = {"float32": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}
BF16_FORWARD_ATOL = 2.0**-4  # extra, of the field's magnitude, when the cache was extracted under bf16 autocast


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """|a - b| <= rtol * |b| + atol * max|b| element-wise; rtol = atol = 0 means exact."""

    rtol: float = 0.0
    atol: float = 0.0

    def atol_for(self, reference: torch.Tensor) -> float:
        """The absolute term for comparing against `reference`: atol * max|reference| (0 when empty)."""
        return self.atol * float(reference.detach().abs().max()) if reference.numel() else 0.0

    def __str__(self) -> str:
        if self.rtol == 0 and self.atol == 0:
            return "exact"
        if self.atol == 0:
            return f"rtol {self.rtol:.2g}"
        return f"rtol {self.rtol:.2g} + {self.atol:.2g}*max"


# float32 values that differ by summation order only (head outputs, float32 features).
F32 = Tolerance(F32_RTOL, F32_ATOL)


def field_tolerances(embed_dtype: str, precision: str = "fp32") -> dict[str, Tolerance]:
    """The tolerance of every compared field, plus "head loss" and "head gradients"."""
    if embed_dtype not in STORAGE_ULP:
        raise UserError(f"unknown embedding dtype '{embed_dtype}' (expected one of {', '.join(STORAGE_ULP)})")
    forward = BF16_FORWARD_ATOL if precision == "bf16" else 0.0
    ulp = STORAGE_ULP[embed_dtype]
    tol = {name: Tolerance() for name in EXACT_FIELDS}
    tol.update({name: Tolerance(F32_RTOL + ulp, F32_ATOL + ulp + forward) for name in EMBED_FIELDS})
    tol.update({name: Tolerance(F32_RTOL, F32_ATOL + forward) for name in LOGIT_FIELDS})
    head = Tolerance(HEAD_RTOL + ulp + forward)
    tol["head loss"] = head
    tol["head gradients"] = head
    return tol
