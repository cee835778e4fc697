"""Modules that run packed weights: drop-in replacements for ``nn.Linear`` and ``nn.Embedding``.

Each keeps its weight as three buffers (``qweight``, ``scales``, ``zeros``; see ``formats``), so the state
dict is the on-disk format. A linear layer runs them through a runtime layout built at its first forward
(a CPU int4/int8 kernel, or a dequantized float copy; see ``kernels``); an embedding dequantizes only the
rows it looks up. A tied output head (``TiedQuantLinear``)
owns no storage: it reads the embedding's buffers, so the quantized tensors exist once in memory and on disk.
"""

from __future__ import annotations

import torch
from torch import nn

from .formats import QuantizedWeight, WeightFormat, dequantize
from .kernels import Runner


class _PackedWeight(nn.Module):
    """Storage shared by QuantLinear and QuantEmbedding: a ``[rows, cols]`` weight in packed form.

    ``dtype`` is the float dtype the weight had, the one an embedding returns (a linear layer follows its
    input instead). ``model.to(torch.bfloat16)`` updates it but leaves scales, mins and codebooks in their
    stored dtype: rounding them would add error to every weight for no saving.
    """

    def __init__(self, rows: int, cols: int, fmt: WeightFormat, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.rows, self.cols, self.fmt = rows, cols, fmt
        self.bits, self.group_size, self.symmetric = fmt.bits, fmt.group_size, fmt.symmetric
        self.dtype = dtype
        groups = cols // fmt.group_size
        scale_dtype = fmt.torch_scale_dtype
        # Empty (on the meta device when loading); ``set_packed`` or ``load_state_dict(assign=True)`` fills them.
        self.register_buffer("qweight", torch.empty(rows, cols * fmt.bits // 8, dtype=torch.uint8, device=device))
        if fmt.codebook:
            table_rows, table_groups = (rows, groups) if fmt.codebook == "group" else (1, 1)
            self.register_buffer("scales", None)
            self.register_buffer("codebook", torch.empty(table_rows, table_groups, 2**fmt.bits, dtype=torch.float16, device=device))
        else:
            self.register_buffer("scales", torch.empty(rows, groups, dtype=scale_dtype, device=device))
            self.register_buffer("codebook", None)
        zeros = None
        if not fmt.symmetric and not fmt.codebook:
            zeros = torch.empty(rows, groups, dtype=torch.uint8 if fmt.zero_point == "integer" else scale_dtype, device=device)
        self.register_buffer("zeros", zeros)

    @property
    def format(self) -> WeightFormat:
        return self.fmt

    def packed(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.codebook)

    def set_packed(self, weight: QuantizedWeight) -> None:
        self.qweight = weight.qweight
        for name in ("scales", "zeros", "codebook"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(weight, name))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` through the runtime layout (rebuilt whenever the buffers were replaced)."""
        runner = self.__dict__.get("_runner")
        if runner is None or not runner.valid_for(self):
            runner = Runner(self)
            self.__dict__["_runner"] = runner  # a plain attribute: not state, not copied into the state dict
        return runner.linear(self, x, self.dequantize, bias)

    def __deepcopy__(self, memo):
        # The runtime layout is derived data; a copy rebuilds its own on first use.
        import copy

        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = None if key == "_runner" else copy.deepcopy(value, memo)
        return clone

    def dequantize(self, dtype: torch.dtype | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight (only ``rows`` of it, when given)."""
        packed = self.packed()
        if rows is not None:
            packed = QuantizedWeight(*(None if t is None or name == "codebook" and t.shape[0] == 1 else t[rows] for name, t in zip(packed._fields, packed)))
        return dequantize(packed, self.format, dtype or self.dtype)

    def logical_numel(self) -> int:
        """How many weights this stands for (parameter counts report the model's logical size)."""
        return self.rows * self.cols

    def packed_nbytes(self) -> int:
        return self.packed().nbytes()

    def _apply(self, fn, recurse=True):
        self.__dict__["_runner"] = None
        kept = {name: getattr(self, name) for name in ("scales", "zeros", "codebook") if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            if getattr(self, name).dtype != before.dtype:  # a dtype cast: follow its device move only
                setattr(self, name, before.to(getattr(self, name).device))
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self


class QuantLinear(_PackedWeight):
    """``y = x @ W.T + b`` from the packed weight (weight-only quantization: memory and disk shrink; decode
    runs a CPU int4/int8 kernel where one fits the format, see ``kernels``)."""

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat, bias: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(out_features, in_features, fmt, dtype, device)
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: QuantizedWeight, fmt: WeightFormat) -> QuantLinear:
        has_bias = linear.bias is not None
        module = cls(linear.in_features, linear.out_features, fmt, has_bias, linear.weight.dtype, device="meta")
        module.set_packed(weight)
        module.bias = linear.bias  # the same float Parameter, untouched
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"


class QuantEmbedding(_PackedWeight):
    """Looks up token rows: gathers only the packed rows of the ids given, then dequantizes those."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: WeightFormat, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(num_embeddings, embedding_dim, fmt, dtype, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, weight: QuantizedWeight, fmt: WeightFormat) -> QuantEmbedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim, fmt, dtype=embedding.weight.dtype, device="meta")
        module.set_packed(weight)
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.dequantize(rows=input_ids.reshape(-1))
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"


class TiedQuantLinear(nn.Module):
    """An output head tied to a QuantEmbedding: ``logits = h @ E.T`` with the embedding's own buffers.

    The embedding is held as a plain attribute, not a submodule, so its buffers appear once in the state
    dict and move once with ``model.to``; ``qweight`` is the embedding's tensor object itself (parameter
    counting deduplicates on it).
    """

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # bypass nn.Module's submodule registration

    qweight = property(lambda self: self.embedding.qweight)
    scales = property(lambda self: self.embedding.scales)
    zeros = property(lambda self: self.embedding.zeros)
    codebook = property(lambda self: self.embedding.codebook)
    format = property(lambda self: self.embedding.format)
    bits = property(lambda self: self.embedding.bits)
    group_size = property(lambda self: self.embedding.group_size)
    symmetric = property(lambda self: self.embedding.symmetric)
    in_features = property(lambda self: self.embedding.embedding_dim)
    out_features = property(lambda self: self.embedding.num_embeddings)
    bias = None

    def logical_numel(self) -> int:
        return self.embedding.logical_numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.linear(x)

    def extra_repr(self) -> str:
        return f"tied to the input embedding ({self.out_features} x {self.in_features}, bits={self.bits})"


PACKED_MODULES = (QuantLinear, QuantEmbedding, TiedQuantLinear)
