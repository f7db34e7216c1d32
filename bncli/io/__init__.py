"""The only module that opens files: safe loading, header peeks, chunked reads, atomic writes.

Security stance: nothing here ever unpickles. ``.pt`` files load with
``torch.load(weights_only=True)``, ``.npy``/``.npz`` with ``allow_pickle=False``, and
``.safetensors`` have no code path at all. A file that would need pickle raises
:class:`~bncli.errors.UnsafeFileError` and is never retried another way.

torch is imported lazily: peeking at a ``.npy``/``.npz``/``.safetensors`` header or
scanning its values with NumPy does not import it.
"""


from bncli.io.formats import (
    CONTAINER_KEYS,
    OUTPUT_SUFFIXES,
    STATE_OUTPUT_SUFFIXES,
    STATE_SUFFIXES,
    TENSOR_SUFFIXES,
    TORCH_SUFFIXES,
    TensorInfo,
    layer_name,
    load_numpy,
    load_state_dict,
    load_tensor,
    parse_vector,
    peek,
    require_file,
    split_container,
    suffix_of,
)
from bncli.io.inputs import DEFAULT_GLOB, expand_inputs, natural_key, parse_glob
from bncli.io.stream import NpyWriter, RawTensor, available_memory, iter_chunks, raw_tensor, read_rows
from bncli.io.write import (
    AtomicGroup,
    atomic_output,
    check_output,
    default_output,
    save_state_dict,
    save_tensor,
    state_writer,
    tensor_writer,
    write_atomic,
)

__all__ = [
    "CONTAINER_KEYS", "DEFAULT_GLOB", "OUTPUT_SUFFIXES", "STATE_OUTPUT_SUFFIXES", "STATE_SUFFIXES",
    "TENSOR_SUFFIXES", "TORCH_SUFFIXES", "AtomicGroup", "NpyWriter", "RawTensor", "TensorInfo",
    "atomic_output", "available_memory", "check_output", "default_output", "expand_inputs", "iter_chunks",
    "layer_name", "load_numpy", "load_state_dict", "load_tensor", "natural_key", "parse_glob",
    "parse_vector", "peek", "raw_tensor", "read_rows", "require_file", "save_state_dict", "save_tensor",
    "split_container", "state_writer", "suffix_of", "tensor_writer", "write_atomic",
]
