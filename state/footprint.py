"""How much memory and disk a model needs, from its config alone (pure; no torch).

    shape = ModelShape.from_config(json.load(open("config.json")))   # text_config if nested
    shape.parameters                                                  # 3_428_000_000-ish
    checkpoint_bytes(shape.parameters, "float32")                     # one step-N/ on disk
    train_memory(shape, batch_size=8, seq_len=1024, ...)              # peak GPU bytes, by part

What the numbers follow is what this project does, not a textbook setup:

- Weights: the run's dtype. A training run with dtype `auto` or `float32` keeps fp32 weights
  and, on CUDA, computes under bf16 autocast (`worker.modeling.load`, `worker.train`): there is
  no separate master copy, the fp32 weights are the masters. Autocast keeps one bf16 copy of
  every weight it casts until the backward is done (`autocast_copies`).
- Gradients: one per parameter, in the weights' dtype.
- Optimizer: `torch.optim.AdamW(foreach=False)` (`worker.optimizer`): `exp_avg` and `exp_avg_sq`
  in the weights' dtype, plus a 0-d fp32 `step` per parameter tensor.
- A step checkpoint (`worker.checkpoints.save_checkpoint`): `save_pretrained` safetensors
  (weights in their dtype, tied embeddings once), `trainer_state.pt` (the optimizer state dict:
  both moments; the scheduler; the RNG states), tokenizer files, config and meta JSON. `final/`
  is the same without `trainer_state.pt`.
- Activations: the tensors a training step keeps for backward in the HF Llama/Mistral decoder
  (Ministral 3 is one), counted tensor by tensor in `_layer_saved_per_token` below, at the
  stage's batch size and sequence length, plus the dense 4D mask this project always passes
  (`worker.masks`: bool (B, 1, T, T)) and the logits + fp32 loss of `worker.probe.token_loss_sum`.
  With gradient checkpointing only each layer's input is kept, and one layer is recomputed at a
  time during backward.

The estimates are checked against measured peaks on CPU in `scripts/bench_plan.py`
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

GB = 1_000_000_000
GIB = 1 << 30

#: Per-tensor bytes of file formats beyond the raw data: a safetensors header entry (name,
#: dtype, shape, offsets as JSON) and a torch.save record of one tensor and its storage (an
#: optimizer state dict has two per parameter). Measured on saved checkpoints
#: (scripts/bench_plan.py): ~100 and ~360 bytes.
SAFETENSORS_PER_TENSOR = 100
TORCH_SAVE_PER_TENSOR = 360
#: RNG states in trainer_state.pt: Python's Mersenne Twister, torch's CPU generator (5056 B),
#: numpy's; a CUDA generator is 16 B per device. Plus the scheduler and param_groups.
RNG_BYTES = 16_000
#: The JSON files beside the weights: config.json, generation_config.json, meta.json.
SMALL_FILES_BYTES = 1_500


class FootprintError(ValueError):
    """A config that lacks what an estimate needs (names the missing key)."""


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (`float32`, `bfloat16`, `float16`)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise FootprintError(
            f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}"
        ) from None


# ---- the model's shape --------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama/Mistral-family decoder that decide its footprint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = ""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From an HF `config.json` dict; a vision+text config (Ministral 3's `mistral3`) is
        read through its `text_config` (the decoder the worker trains; the vision tower is
        dropped at load, `worker.modeling._load_text_only`)."""
        text = config.get("text_config")
        cfg: Mapping[str, Any] = text if isinstance(text, Mapping) else config

        def need(key: str) -> int:
            value = cfg.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise FootprintError(f"model config has no usable {key!r} (got {value!r})")
            return value

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        tied = cfg.get("tie_word_embeddings")
        if tied is None:  # a nested text_config may leave it to the outer config
            tied = config.get("tie_word_embeddings", True)
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=int(kv),
            head_dim=int(head_dim),
            tie_word_embeddings=bool(tied),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            model_type=str(cfg.get("model_type", "")),
        )

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def layer_parameters(self) -> int:
        """One decoder layer: q/k/v/o projections, the gated MLP, two RMSNorms."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        if self.attention_bias:
            attn += self.q_dim + 2 * self.kv_dim + h
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        return attn + mlp + 2 * h

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def parameters(self) -> int:
        """Every parameter of the causal LM, tied embeddings counted once."""
        head = 0 if self.tie_word_embeddings else self.embedding_parameters
        return (
            self.embedding_parameters
            + self.num_hidden_layers * self.layer_parameters
            + self.hidden_size  # final norm
            + head
        )

    @property
    def tensors(self) -> int:
        """How many parameter tensors the model has (per-tensor file and optimizer overheads)."""
        per_layer = 9 + (4 if self.attention_bias else 0) + (3 if self.mlp_bias else 0)
        return self.num_hidden_layers * per_layer + 2 + (0 if self.tie_word_embeddings else 1)


# ---- disk -----------------------------------------------------------------------------------


def weights_file_bytes(params: int, weight_dtype: str = "float32", *, tensors: int = 0) -> int:
    """The `*.safetensors` of `save_pretrained`: raw data in the weights' dtype plus headers."""
    return params * dtype_bytes(weight_dtype) + tensors * SAFETENSORS_PER_TENSOR


def optimizer_state_bytes(params: int, weight_dtype: str = "float32", *, tensors: int = 0) -> int:
    """AdamW's `exp_avg` and `exp_avg_sq` (the weights' dtype) and a 0-d fp32 `step` per
    tensor, in memory or pickled into `trainer_state.pt`."""
    return 2 * params * dtype_bytes(weight_dtype) + tensors * 4


def checkpoint_bytes(
    params: int,
    weight_dtype: str = "float32",
    *,
    optimizer: bool = True,
    tensors: int = 0,
    extra_bytes: int = 0,
) -> int:
    """Bytes of one checkpoint dir as `worker.checkpoints.save_checkpoint` writes it.

    `params`: parameter count (tied embeddings once); `weight_dtype`: the dtype the weights
    are held (and saved) in; `optimizer=False` for `final/` (no `trainer_state.pt`);
    `tensors`: number of parameter tensors (per-tensor overheads, 0 to ignore them);
    `extra_bytes`: tokenizer files and anything else saved beside the weights.
    """
    total = weights_file_bytes(params, weight_dtype, tensors=tensors)
    if optimizer:
        total += optimizer_state_bytes(params, weight_dtype, tensors=tensors)
        total += tensors * 2 * TORCH_SAVE_PER_TENSOR + RNG_BYTES
    return total + SMALL_FILES_BYTES + extra_bytes


def checkpoints_peak_bytes(
    step_bytes: int, keep: int, final_bytes: int = 0, *, saves: int | None = None
) -> int:
    """The most checkpoint bytes a run has on disk at once, by `worker.checkpoints`' rule
    (prune before save): while a step checkpoint is written, `max(keep - 1, 1)` complete ones
    are beside it (keep=1 keeps the previous one until the new one is complete), so at most
    `max(keep, 2)` step checkpoints; `final/` is written beside the newest step checkpoint
    only. `saves`: how many step saves the run makes (fewer saves, fewer on disk); None: many."""
    held = max(keep, 2) if saves is None else min(saves, max(keep, 2))
    beside_final = 1 if saves is None else min(saves, 1)
    return max(held * step_bytes, beside_final * step_bytes + final_bytes)


# ---- GPU memory -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of one stage (bytes): its parts, and the peak, which is not their sum (the
    activations are gone before the gradients are complete). `phase` says when the peak is:
    `loss` (forward done, backward of the loss under way), `backward` (a checkpointed layer
    recomputed), `step` (optimizer step: every gradient plus AdamW's temporaries), `forward`."""

    weights: int
    gradients: int = 0
    optimizer: int = 0
    autocast_copies: int = 0
    activations: int = 0
    peak: int = 0
    phase: str = "forward"

    @property
    def total(self) -> int:
        """The peak (bytes): what the device must hold at the worst moment."""
        return self.peak or (
            self.weights + self.gradients + self.optimizer + self.autocast_copies + self.activations
        )

    def parts(self) -> dict[str, int]:
        """The parts by name, for tables and JSON."""
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "autocast_copies": self.autocast_copies,
            "activations": self.activations,
        }


def _norm_saved(in_bytes: int) -> int:
    """Bytes per hidden unit an HF RMSNorm keeps: an fp32 copy of a non-fp32 input, the
    normalised fp32 tensor, and its cast back to the input dtype (`x.to(fp32)`, `x * rsqrt`,
    `.to(input_dtype)`; the weight product's output is the next op's input, counted there)."""
    return 4 + (0 if in_bytes == 4 else 2 * in_bytes)


def _layer_saved_per_token(
    s: ModelShape, *, res: int, act: int, autocast: bool, seq_len: int
) -> int:
    """Bytes per token one HF Llama/Mistral decoder layer keeps for backward (no gradient
    checkpointing), counted tensor by tensor from `modeling_ministral3.py` and autograd's
    saved-tensor rules (a product with a constant, such as rotary's cos/sin, keeps only the
    constant):

    - the residual stream at the layer's input and after attention (`res`: the weights' dtype);
    - both RMSNorms (`_norm_saved`);
    - the projections' inputs: the normed tensor once (weights' dtype), or under autocast one
      bf16 cast per projection (q, k, v; gate, up);
    - SDPA: q, k and v (k and v repeated to every query head: a 4D mask turns off SDPA's GQA
      path, `transformers.integrations.sdpa_attention.use_gqa_in_sdpa`), the output, the
      logsumexp (fp32 per head), and the float copy of the bool mask SDPA makes
      (`convert_boolean_attn_mask`: B x T x T per layer, i.e. `seq_len` per token);
    - o_proj's input (the output transposed back, a copy);
    - the MLP: gate, SiLU(gate), up and their product.
    """
    h, i, q = s.hidden_size, s.intermediate_size, s.q_dim
    proj_in = (3 + 2) * act * h if autocast else 2 * res * h
    return (
        2 * res * h
        + 2 * _norm_saved(res) * h
        + proj_in
        + 5 * act * q
        + act * seq_len
        + 4 * s.num_attention_heads
        + 4 * act * i
    )


def train_memory(
    shape: ModelShape,
    *,
    batch_size: int,
    seq_len: int,
    weight_dtype: str = "float32",
    autocast_bf16: bool = False,
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """Peak memory of a training step (from the second step on: AdamW's state exists) at
    `batch_size` x `seq_len` tokens per micro-batch, the worst case of a padded batch.

    `weight_dtype`: the weights' dtype (fp32 for this project's training); `autocast_bf16`:
    compute in bf16 under autocast (the trainer does on CUDA with fp32 weights). The peak is the
    largest of three moments:

    - `loss`: the forward's saved tensors, the logits (compute dtype), the loss's fp32
      log-softmax and two vocab-sized fp32 gradients while its backward runs
      (`worker.probe.token_loss_sum`); no gradients yet (`zero_grad(set_to_none=True)`);
    - `backward`: every gradient, one checkpointed layer recomputed with its saved tensors;
    - `step`: weights, gradients, AdamW state and its per-tensor temporaries (`foreach=False`:
      `exp_avg_sq.sqrt()` and its quotient, the largest parameter's size twice).
    """
    s = shape
    p = s.parameters
    wb = dtype_bytes(weight_dtype)
    act = 2 if autocast_bf16 else wb
    res = wb  # the residual stream: embedding output plus adds, in the weights' dtype
    tokens = batch_size * seq_len
    weights = grads = p * wb
    opt = optimizer_state_bytes(p, weight_dtype, tensors=s.tensors)
    layer = (
        _layer_saved_per_token(s, res=res, act=act, autocast=autocast_bf16, seq_len=seq_len)
        * tokens
    )
    boundary = res * s.hidden_size * tokens  # a checkpointed layer keeps its input only
    # outside the layers: the last residual, the final norm and lm_head's input, rotary
    # cos/sin (B x T x head_dim each, the residual's dtype), the bool 4D mask
    head_in = (2 if autocast_bf16 else wb) * s.hidden_size
    outside = (res * s.hidden_size + _norm_saved(res) * s.hidden_size + head_in) * tokens + (
        2 * s.head_dim * res + seq_len
    ) * tokens
    kept = s.num_hidden_layers * (boundary if gradient_checkpointing else layer) + outside
    loss_peak = (act + 12) * s.vocab_size * tokens
    layer_matrix = s.hidden_size * max(s.q_dim, s.intermediate_size)
    embedding = s.embedding_parameters
    # bf16 copies of the weights under autocast, held by the graph until backward; a
    # checkpointed layer's go with the autocast cache when the forward leaves autocast
    held = embedding if gradient_checkpointing else p
    copies = 2 * held if autocast_bf16 else 0
    at_loss = weights + opt + copies + kept + loss_peak
    at_backward = weights + opt + grads + s.num_hidden_layers * boundary + outside + layer
    at_step = weights + grads + opt + 2 * wb * max(layer_matrix, embedding)
    phase, peak = max(
        (("loss", at_loss), ("backward", at_backward), ("step", at_step)), key=lambda x: x[1]
    )
    return MemoryEstimate(
        weights=weights,
        gradients=grads,
        optimizer=opt,
        autocast_copies=copies,
        activations=kept + loss_peak,
        peak=peak,
        phase=phase,
    )


def eval_memory(
    shape: ModelShape,
    *,
    batch_size: int,
    seq_len: int,
    weight_dtype: str = "bfloat16",
    choices: int = 4,
    continuation_len: int = 32,
) -> MemoryEstimate:
    """Peak memory of the worker's shared-context evaluation (`worker.evaluate.score_shared`)
    of `batch_size` questions with contexts up to `seq_len`: the weights, the contexts' KV
    cache and its copy per choice (`reorder_cache`), one layer's transient tensors, the float
    mask, and the continuations' logits with their fp32 log-softmax."""
    s = shape
    wb = dtype_bytes(weight_dtype)
    tokens = batch_size * seq_len
    kv = 2 * s.num_hidden_layers * s.kv_dim * wb * seq_len  # per row
    cache = kv * batch_size * (1 + choices)
    transient = (4 * s.hidden_size + 4 * s.q_dim + 2 * s.intermediate_size) * wb * tokens
    mask = tokens * seq_len * (1 + wb)
    rows = batch_size * choices
    logits = rows * continuation_len * s.vocab_size * (wb + 8)
    activations = cache + transient + mask + logits
    weights = s.parameters * wb
    return MemoryEstimate(
        weights=weights, activations=activations, peak=weights + activations, phase="forward"
    )
