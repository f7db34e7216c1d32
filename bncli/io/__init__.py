"""The only module that opens files: safe loading, header peeks, chunked reads, atomic writes.

Security stance: nothing here ever unpickles. ``.pt`` files load with
``torch.load(weights_only=True)``, ``.npy``/``.npz`` with ``allow_pickle=False``, and
``.safetensors`` have no code path at all. A file that would need pickle raises
:class:`~bncli.errors.UnsafeFileError` and is never retried another way.

Standard input (``-``) is read whole into a :class:`MemoryFile` that every loader takes
like a path (:mod:`bncli.io.stdio`); whole containers are read and written back with some
tensors replaced by :mod:`bncli.io.containers`.

torch is imported lazily: peeking at a ``.npy``/``.npz``/``.safetensors`` header or
scanning its values with NumPy does not import it.
"""


from bncli.io.containers import BARE_NAME, Container, OutputPlan, container_writer, load_container, plan_output
from bncli.io.formats import (
    CONTAINER_KEYS,
    OUTPUT_SUFFIXES,
    STATE_OUTPUT_SUFFIXES,
    STATE_SUFFIXES,
    TENSOR_SUFFIXES,
    TORCH_SUFFIXES,
    TensorInfo,
    choose_key,
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
from bncli.io.source import MemoryFile, Source, as_source
from bncli.io.stdio import FORMATS, STDIO, check_stdout, detect_format, is_stdio, read_stdin, write_stdout
from bncli.io.stream import NpyWriter, RawTensor, available_memory, iter_chunks, raw_tensor, read_rows
from bncli.io.write import (
    AtomicGroup,
    atomic_output,
    check_output,
    default_output,
    output_folder,
    save_state_dict,
    save_tensor,
    state_writer,
    tensor_writer,
    write_atomic,
    write_npz_members,
)

__all__ = [
    "BARE_NAME", "CONTAINER_KEYS", "DEFAULT_GLOB", "FORMATS", "OUTPUT_SUFFIXES", "STATE_OUTPUT_SUFFIXES",
    "STATE_SUFFIXES", "STDIO", "TENSOR_SUFFIXES", "TORCH_SUFFIXES", "AtomicGroup", "Container", "MemoryFile",
    "NpyWriter", "OutputPlan", "RawTensor", "Source", "TensorInfo", "as_source", "atomic_output",
    "available_memory", "check_output", "check_stdout", "choose_key", "container_writer", "default_output",
    "detect_format", "expand_inputs", "is_stdio", "iter_chunks", "layer_name", "load_container", "load_numpy",
    "load_state_dict", "load_tensor", "natural_key", "output_folder", "parse_glob", "parse_vector", "peek",
    "plan_output", "raw_tensor", "read_rows", "read_stdin", "require_file", "save_state_dict", "save_tensor",
    "split_container", "state_writer", "suffix_of", "tensor_writer", "write_atomic", "write_npz_members",
    "write_stdout",
]
