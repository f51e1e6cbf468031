"""CPU emulation of the sparse tensor core kernel in csrc/sparse/cuda/semi24.cu.

Two halves, kept apart on purpose:

* ``mma_sp_m16n8k32``: what the hardware does with the registers of one warp, written from the
  PTX ISA description of ``mma.sp.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}`` (sparse A
  fragment = dense m16n8k16 A fragment of the compressed 16 x 16 tile; metadata, sparsity selector
  0: lane 4g + t, t < 2, bits 16h + 4q .. + 3 hold the indices of group 4t + q of row g + 8h; B and
  C/D fragments as for the dense m16n8k16/k32 shapes).
* ``run_kernel``: the kernel's own data movement, step by step (cp.async stage layout with its
  padding and predicates, ldmatrix addressing, the metadata word each lane loads, the epilogue),
  for one of the kernel's tile configurations.

The packer (``semi24_compress``) and the kernel's addressing are thus checked against the
instruction's documented semantics without a GPU.
"""

from __future__ import annotations

import torch

A_STRIDE = 40  # halves per shared-memory row of the values tile (32 + 8 padding)
B_STRIDE = 72  # halves per shared-memory row of the activation tile (64 + 8 padding)
INVALID_NIBBLES = {0b0000, 0b0101, 0b1010, 0b1111}

# (WN, WM, MT, NT): the kernel's two tile configurations (dispatch_tile)
CONFIGS = {"small_m": (4, 1, 1, 4), "large_m": (2, 2, 2, 8)}


def ldmatrix_x4(smem: torch.Tensor, addr: list[tuple[int, int]]) -> list[list[tuple[float, float]]]:
    """``ldmatrix.sync.aligned.m8n8.x4.b16``: lanes 8i..8i+7 give the row addresses of matrix i;
    lane L receives from matrix i the elements (row L // 4, columns 2 (L % 4), +1)."""
    regs = [[None] * 4 for _ in range(32)]
    for i in range(4):
        for lane in range(32):
            row, col = addr[8 * i + lane // 4]
            c = col + 2 * (lane % 4)
            regs[lane][i] = (float(smem[row, c]), float(smem[row, c + 1]))
    return regs


def mma_sp_m16n8k32(a, b, e, acc):
    """One sparse mma (sparsity selector 0) from per-lane registers; updates acc[lane][0..3]."""
    A = torch.zeros(16, 32, dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            row = g + 8 * (i % 2)
            for h in range(2):
                cc = 2 * t + 8 * (i // 2) + h  # compressed column 0..15
                group, slot = cc // 2, cc % 2
                word = e[4 * (row % 8) + group // 4]
                nib = (word >> (16 * (row // 8) + 4 * (group % 4))) & 15
                assert nib not in INVALID_NIBBLES, f"invalid metadata nibble {nib:#06b}"
                i0, i1 = nib & 3, (nib >> 2) & 3
                assert i0 < i1, "metadata indices must be ordered"
                A[row, 4 * group + (i0, i1)[slot]] += a[lane][i][h]
    B = torch.zeros(32, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            for h in range(2):
                B[8 * i + 2 * t + h, g] = b[lane][i][h]
    D = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        acc[lane][0] += float(D[g, 2 * t])
        acc[lane][1] += float(D[g, 2 * t + 1])
        acc[lane][2] += float(D[g + 8, 2 * t])
        acc[lane][3] += float(D[g + 8, 2 * t + 1])


def run_kernel(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias, K: int,
               config: str = "large_m") -> torch.Tensor:
    """y [M, N] as computed by semi24_kernel (all blocks), in float64."""
    WN, WM, MT, NT = CONFIGS[config]
    BN, BM = WN * MT * 16, WM * NT * 8
    M, N = x.shape[0], values.shape[0]
    Kp = (K + 31) // 32 * 32
    KT, KP2, Kx = Kp // 32, Kp // 2, (K + 7) // 8 * 8
    NTILES = (N + 15) // 16
    KB = (KT + 1) // 2
    xs = torch.zeros(M, Kx, dtype=torch.float64)  # the binding's zero-padded copy (K -> Kx)
    xs[:, :K] = x.double()
    vals = values.double()
    words = meta.to(torch.int32).reshape(-1) & 0xFFFF  # int16 words, flat
    y = torch.zeros(M, N, dtype=torch.float64)
    for bn in range((N + BN - 1) // BN):
        for bm in range((M + BM - 1) // BM):
            n_block, m_block = bn * BN, bm * BM
            acc = {(w, i, j): [[0.0] * 4 for _ in range(32)]
                   for w in range(WN * WM) for i in range(MT) for j in range(NT)}
            for kb in range(KB):
                # load_stage
                sa = torch.zeros(BN, A_STRIDE, dtype=torch.float64)
                for r in range(BN):
                    for cc in range(4):
                        n, col = n_block + r, kb * 32 + cc * 8
                        if n < N and col < KP2:
                            sa[r, cc * 8:cc * 8 + 8] = vals[n, col:col + 8]
                sb = torch.zeros(BM, B_STRIDE, dtype=torch.float64)
                for r in range(BM):
                    for cc in range(8):
                        m, col = m_block + r, kb * 64 + cc * 8
                        if m < M and col < Kx:
                            sb[r, cc * 8:cc * 8 + 8] = xs[m, col:col + 8]
                se = [0] * ((BN // 16) * 2 * 16)  # uint32 words
                for tile in range(BN // 16):
                    for ks in range(2):
                        nt, kt = n_block // 16 + tile, kb * 2 + ks
                        for w in range(16):
                            if nt < NTILES and kt < KT:
                                base = (nt * KT + kt) * 32 + 2 * w
                                word = int(words[base]) | (int(words[base + 1]) << 16)
                            else:
                                word = 0x44444444
                            se[(tile * 2 + ks) * 16 + w] = word
                for ks in range(2):
                    if kb * 2 + ks >= KT:
                        break
                    for warp in range(WN * WM):
                        warp_n, warp_m = warp % WN, warp // WN
                        a_regs, e_regs = [], []
                        for i in range(MT):
                            addr = []
                            for lane in range(32):
                                row = warp_n * MT * 16 + i * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)
                                addr.append((row, ks * 16 + 8 * (lane >> 4)))
                            a_regs.append(ldmatrix_x4(sa, addr))
                            tile = warp_n * MT + i
                            e_regs.append([se[(tile * 2 + ks) * 16 + (lane >> 2) * 2 + (lane & 3)]
                                           if (lane & 3) < 2 else 0 for lane in range(32)])
                        for j in range(NT):
                            addr = [(warp_m * NT * 8 + j * 8 + (lane & 7), ks * 32 + 8 * (lane >> 3))
                                    for lane in range(32)]
                            b_regs = ldmatrix_x4(sb, addr)
                            for i in range(MT):
                                mma_sp_m16n8k32(a_regs[i], b_regs, e_regs[i], acc[(warp, i, j)])
            # epilogue
            for warp in range(WN * WM):
                warp_n, warp_m = warp % WN, warp // WN
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    for i in range(MT):
                        n_lo = n_block + warp_n * MT * 16 + i * 16 + g
                        n_hi = n_lo + 8
                        for j in range(NT):
                            m0 = m_block + warp_m * NT * 8 + j * 8 + 2 * t
                            for q in range(2):
                                m = m0 + q
                                if m >= M:
                                    continue
                                d = acc[(warp, i, j)][lane]
                                if n_lo < N:
                                    y[m, n_lo] = d[q] + (float(bias[n_lo]) if bias is not None else 0.0)
                                if n_hi < N:
                                    y[m, n_hi] = d[2 + q] + (float(bias[n_hi]) if bias is not None else 0.0)
    return y
