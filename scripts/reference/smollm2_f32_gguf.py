"""Write SmolLM2-135M-Instruct's GGUF with every tensor dequantized to float32 (the ``gguf``
package's own dequantizer), all metadata copied: the weights kiapi computes with on the CPU,
in the file format llama.cpp reads. Nothing of kiapi, MLX or mlx-lm is imported.

Why: llama.cpp multiplies Q4_1 weights with activations quantized to 8 bits (its Q8_1 dot
products), so on the quantized file its greedy tokens part from any float computation at
near ties. On this float32 file it multiplies in floats, so agreement there checks the
architecture (rope, norms, attention, template tokens) independently of that rounding.

    /tmp/gguf-ref/bin/python scripts/reference/smollm2_f32_gguf.py Q4_1_GGUF OUT_F32_GGUF
"""

from __future__ import annotations

import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize


def main(source: str, target: str) -> None:
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(target, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape([int(n) for n in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
