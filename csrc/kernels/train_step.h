// Layout of the noise-level table of the fused training step (SPEC sections 1 and 3,
// Algorithm 1 with loss (6)), shared by the CPU (cpu/dae_blocks.h train_block) and CUDA
// (cuda/train_step.cu) kernels and the argument checks.
//
// levels is [L, 5] with columns (s, gamma, lambda, c, phi); level_bias is [L, K] or null. Slot m
// of instance p draws (i, l, eps) from the Philox stream (philox.h), forms
// x_t = s_l x_i + gamma_l eps, denoises it (hard: component from the CLEAN x_i, eq. (17); soft:
// eq. (9) with the level's c, phi, bias) and contributes lambda_l ||x_theta - x_i||^2 / M.
#pragma once

namespace molrg::kernels {

enum LevelColumn : int { kLvS = 0, kLvGamma = 1, kLvLambda = 2, kLvC = 3, kLvPhi = 4, kLvCols = 5 };

}  // namespace molrg::kernels
