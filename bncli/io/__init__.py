"""The only module that opens files: safe loading, header peeks, chunked reads, atomic writes.

Security stance: nothing here ever unpickles. ``.pt`` files load with
``torch.load(weights_only=True)``, ``.npy``/``.npz`` with ``allow_pickle=False``, and
``.safetensors`` have no code path at all. A file that would need pickle raises
:class:`~bncli.errors.UnsafeFileError` and is never retried another way.

torch is imported lazily: peeking at a ``.npy``/``.npz``/``.safetensors`` header or
scanning its values with NumPy does not import it.
"""


from bncli.io.formats import (
    STATE_SUFFIXES,
    TENSOR_SUFFIXES,
    TensorInfo,
    load_numpy,
    load_state_dict,
    load_tensor,
    parse_vector,
    peek,
    suffix_of,
)
from bncli.io.inputs import DEFAULT_GLOB, expand_inputs, natural_key, parse_glob
from bncli.io.stream import NpyWriter, RawTensor, available_memory, iter_chunks, raw_tensor, read_rows
from bncli.io.write import atomic_output, check_output, default_output, save_state_dict, save_tensor, write_atomic

__all__ = [
    "DEFAULT_GLOB", "STATE_SUFFIXES", "TENSOR_SUFFIXES", "NpyWriter", "RawTensor", "TensorInfo", "atomic_output",
    "available_memory", "check_output", "default_output", "expand_inputs", "iter_chunks", "load_numpy",
    "load_state_dict", "load_tensor", "natural_key", "parse_glob", "parse_vector", "peek", "raw_tensor", "read_rows",
    "save_state_dict", "save_tensor", "suffix_of", "write_atomic",
]
