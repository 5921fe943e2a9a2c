"""Regenerate tests/data/nf4_golden.safetensors from bitsandbytes.

Run with bitsandbytes installed (the committed file came from bitsandbytes
0.50.2 on the CPU): `python tests/data/make_golden.py`. Inputs are stored
too, so the test never depends on a random generator's stream.
"""

from pathlib import Path

import bitsandbytes
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file

CASES = [  # (shape, dtype, blocksize, double_quant)
    ((37, 29), torch.float32, 64, False),
    ((37, 29), torch.float32, 64, True),
    ((1001,), torch.float16, 32, False),
    ((1001,), torch.float16, 128, True),
    ((5, 77), torch.bfloat16, 64, False),
    ((5, 77), torch.bfloat16, 256, True),
    ((64, 300), torch.bfloat16, 64, True),
    ((3,), torch.float32, 4096, False),
    ((3, 1, 11), torch.float16, 1024, True),
    ((257, 64), torch.float32, 2048, True),
    ((513,), torch.float32, 512, False),
    ((128, 130), torch.float16, 64, True),
]


def main():
    g = torch.Generator().manual_seed(2024)
    tensors = {}
    for i, (shape, dtype, blocksize, dq) in enumerate(CASES):
        name = f"case{i:02d}"
        w = (torch.randn(shape, generator=g) * (0.02 + i)).to(dtype)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=dq)
        tensors[f"{name}/input"] = w
        tensors[f"{name}/blocksize"] = torch.tensor(blocksize)
        tensors[f"{name}/packed"] = packed
        tensors[f"{name}/absmax"] = state.absmax
        if dq:
            tensors[f"{name}/offset"] = state.offset
            tensors[f"{name}/nested_absmax"] = state.state2.absmax
        tensors[f"{name}/dequantized"] = F.dequantize_4bit(packed, state)
    out = Path(__file__).with_name("nf4_golden.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, out,
              metadata={"source": f"bitsandbytes {bitsandbytes.__version__}, CPU"})
    print(f"wrote {out} ({len(CASES)} cases)")


if __name__ == "__main__":
    main()
