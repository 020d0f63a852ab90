# Dense MLP vs mixture of experts: 4 routed experts, top-2, plus 1 shared expert (DeepSeekMoE).
# About 2.5x the MLP parameters, ~1.5x active per token; compare at equal steps and at equal tok/s.
#   python train.py config/ablate_base.py config/ablate_moe.py
#   python train.py config/ablate_base.py config/ablate_moe.py --moe_capacity=1.25 --out_dir=out-ablate-moe-cap
out_dir = 'out-ablate-moe'
n_experts = 4
moe_top_k = 2
n_shared_experts = 1
moe_aux_coef = 0.01   # Switch load-balancing loss
moe_z_coef = 0.001    # ST-MoE router z-loss
moe_capacity = 0.0    # 0 = no token dropping
