"""Where the skinny decode GEMM (kernels/skinny_gemm.py) measured faster than torch (cuBLASLt):
written by ``python bench/skinny_gemm.py --write-table`` on the GPU, never by hand.

``WINS[(device name, N, K, M)] = (block_n, block_k, split_k, num_warps, num_stages, use_dot)``,
M in (1, 2, 4, 8, 16); only entries whose best config beat torch by ``MIN_GAIN`` are kept.
Empty until a GPU run is committed: every linear layer then runs torch.
"""

MIN_GAIN = 0.02  # the kernel's time must be at least 2% under torch's (run-to-run noise)
SOURCE = ""  # the results file the table came from
WINS: dict = {}
