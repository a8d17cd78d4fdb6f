"""What bench_gpu.py measures and render_gpu.py renders, without importing torch.

render_gpu.py (and the test that checks RESULTS.md against the raw JSON) needs these two tables
but not the GPU code, so they live here rather than in bench_gpu.py.
"""

from __future__ import annotations

# Step configurations: label -> families kept in BF16 (None: everything BF16).
SIX_FAMILIES_KEEP = {"bf16": None, "fp8_all": [], "fp8_keep_img_mlp": ["img_mlp"]}

# GEMM shape name (bench_gpu.gemm_shapes) -> the layer family it belongs to.
FAMILY_OF_SHAPE = {"to_q/k/v (img)": "to_qkv", "to_out (img)": "to_out", "img_mlp up": "img_mlp",
                   "img_mlp down": "img_mlp", "add_q/k/v (txt)": "add_kv_proj",
                   "to_add_out (txt)": "to_add_out", "txt_mlp up": "txt_mlp",
                   "txt_mlp down": "txt_mlp"}
