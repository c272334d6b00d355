"""Where the skinny decode GEMM (kernels/skinny_gemm.py) measured faster than torch (cuBLASLt):
written by ``python bench/skinny_gemm.py --write-table`` on the GPU, never by hand.

``WINS[(device name, N, K, M)] = (block_n, block_k, split_k, num_warps, num_stages, use_dot)``,
M in (1, 2, 4, 8, 16); only entries whose best config beat torch by ``MIN_GAIN`` are kept.
``SOURCES`` names each GPU's results file; a GPU with no entries runs torch in every linear layer.
A run on one GPU replaces that GPU's entries only.
"""

MIN_GAIN = 0.02  # the kernel's time must be at least 2% under torch's (run-to-run noise)
SOURCES = {
    'NVIDIA H100 80GB HBM3': 'bench/results/skinny_gemm_h100.md',
}
WINS: dict = {
    ('NVIDIA H100 80GB HBM3', 4096, 4096, 1): (32, 256, 1, 4, 4, True),
    ('NVIDIA H100 80GB HBM3', 4096, 4096, 2): (32, 256, 1, 4, 4, True),
    ('NVIDIA H100 80GB HBM3', 4096, 4096, 4): (32, 256, 1, 4, 4, True),
    ('NVIDIA H100 80GB HBM3', 4096, 4096, 8): (32, 256, 1, 4, 4, True),
    ('NVIDIA H100 80GB HBM3', 4096, 4096, 16): (32, 256, 1, 4, 4, True),
    ('NVIDIA H100 80GB HBM3', 4096, 14336, 16): (32, 256, 1, 4, 4, True),
    ('NVIDIA H100 80GB HBM3', 6144, 4096, 1): (64, 128, 1, 4, 4, True),
    ('NVIDIA H100 80GB HBM3', 128256, 4096, 1): (64, 128, 1, 4, 4, True),
    ('NVIDIA H100 80GB HBM3', 128256, 4096, 2): (32, 256, 1, 4, 4, True),
    ('NVIDIA H100 80GB HBM3', 128256, 4096, 4): (64, 128, 1, 4, 4, True),
    ('NVIDIA H100 80GB HBM3', 128256, 4096, 8): (64, 128, 1, 4, 4, True),
    ('NVIDIA H100 80GB HBM3', 128256, 4096, 16): (64, 128, 1, 4, 4, True),
}
