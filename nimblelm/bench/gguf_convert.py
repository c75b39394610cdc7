"""Write a GGUF of the same weights at another precision (F32, F16, Q8_0, Q4_0, Q4_1), in GGUF layout.

llama.cpp is measured on the weights nimblelm runs: nimblelm dequantizes the packaged GGUF to fp32, so
the llama.cpp peer gets a GGUF written from the same file (every metadata key copied, every tensor
dequantized with gguf.quants.dequantize, then stored at the asked type: gguf.quants.quantize for the
block formats, which match nimblelm's int8 / int4 runs). No re-permutation is needed since the layout
stays GGUF's.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

# name -> (GGMLQuantizationType name, general.file_type as gguf.LlamaFileType names it)
OUT_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
             "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1")}


def converted_path(source: Path, out_type: str, folder: Path) -> Path:
    st = source.stat()
    tag = hashlib.sha256(f"{source.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:10]
    return folder / f"{source.stem}.{out_type.upper()}.{tag}.gguf"


def convert_gguf(source: str | os.PathLike, dest: str | os.PathLike, out_type: str = "f32") -> Path:
    """Write `dest`: `source`'s metadata and tensors, every tensor dequantized and stored as out_type.

    1-D tensors (norms, biases) stay F32 as llama.cpp's converters keep them; so does a matrix whose rows
    do not split into the block format's 32-value blocks (llama.cpp's converters fall back the same way).
    """
    import gguf

    out_type = out_type.lower()
    if out_type not in OUT_TYPES:
        raise ValueError(f"unsupported GGUF output type {out_type!r} (choose from {', '.join(OUT_TYPES)})")
    qname, ftype_name = OUT_TYPES[out_type]
    target_qtype = gguf.GGMLQuantizationType[qname]
    file_type = int(gguf.LlamaFileType[ftype_name])
    block = gguf.GGML_QUANT_SIZES[target_qtype][0]
    source, dest = Path(source), Path(dest)
    reader = gguf.GGUFReader(source)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = arch_field.contents() if arch_field is not None else "llama"
    tmp = dest.with_name(dest.name + ".part")
    writer = gguf.GGUFWriter(tmp, arch=arch)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_uint32(field.name, file_type)
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    if reader.get_field(gguf.Keys.General.FILE_TYPE) is None:
        writer.add_uint32(gguf.Keys.General.FILE_TYPE, file_type)

    arrays = []
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.asarray(arr, dtype=np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF dims are innermost first
        arr = arr.reshape(shape)
        if arr.ndim == 1 or target_qtype == gguf.GGMLQuantizationType.F32 or shape[-1] % block:
            raw = gguf.GGMLQuantizationType.F32
        elif target_qtype == gguf.GGMLQuantizationType.F16:
            arr, raw = arr.astype(np.float16), target_qtype
        else:
            arr, raw = gguf.quants.quantize(arr, target_qtype), target_qtype
        arrays.append((t.name, arr, raw))
    for name, arr, raw in arrays:
        writer.add_tensor(name, arr, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dest)
    return dest


def ensure_converted(source: str | os.PathLike, out_type: str, folder: str | os.PathLike) -> Path:
    """The cached converted GGUF, written on first use."""
    source = Path(source)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dest = converted_path(source, out_type, folder)
    if not dest.is_file():
        convert_gguf(source, dest, out_type)
    return dest
