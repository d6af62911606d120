"""CI: the gpu extra resolves to GPU builds only, on one CUDA major.

Reads the report of ``pip install --dry-run --ignore-installed --report REPORT ".[gpu]"``: no CPU
build of ONNX Runtime or faiss (they would overwrite the GPU builds' modules), both GPU builds
present, and every CUDA library for CUDA 12.
"""

import json
import re
import sys

installed = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
print(sorted(installed.items()))
cpu_builds = sorted({"onnxruntime", "faiss-cpu"} & set(installed))
assert not cpu_builds, f"the gpu extra pulls CPU builds: {cpu_builds}"
assert {"onnxruntime-gpu", "faiss-gpu-cu12"} <= set(installed), "the gpu extra lacks its GPU builds"
cuda_libraries = [n for n in installed if re.search(r"-cu\d+$", n) or n.startswith("nvidia-")]
other_major = sorted(n for n in cuda_libraries if not n.endswith("-cu12"))
assert not other_major, f"libraries of another CUDA major (or none named): {other_major}"
print("the gpu extra: GPU builds only, CUDA 12 throughout")
