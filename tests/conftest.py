"""Test-session setup. Runs before any test module imports torch or triton."""

import os
import shutil

# Triton kernels run on CPU tensors only through its interpreter, and the variable is read when
# triton is first imported: set it here, before anything imports triton, on machines without a
# GPU (CI). On a GPU machine the real kernels are tested instead.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
