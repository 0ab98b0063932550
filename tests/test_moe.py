"""The grouped-sigmoid MoE MLP (LLaDA2.x's) against transformers' Glm4MoeMoE, which routes the same way (sigmoid
scores, expert bias for the choice only, group-limited top-k by the sum of each group's top-2, normalised unbiased
weights times routed_scaling_factor, shared experts)."""

from __future__ import annotations

import pytest
import torch

from s2d2.models.moe import MoEConfig, MoEMLP, route

CFG = MoEConfig(hidden_size=32, moe_intermediate_size=16, num_experts=16, top_k=4, n_group=4, topk_group=2,
                num_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)


def pair(seed: int = 0):
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    hf = Glm4MoeMoE(Glm4MoeConfig(hidden_size=CFG.hidden_size, moe_intermediate_size=CFG.moe_intermediate_size,
                                  n_routed_experts=CFG.num_experts, num_experts_per_tok=CFG.top_k,
                                  n_group=CFG.n_group, topk_group=CFG.topk_group, n_shared_experts=1,
                                  routed_scaling_factor=CFG.routed_scaling_factor, norm_topk_prob=True)).eval()
    gen = torch.Generator().manual_seed(seed)
    ours = MoEMLP(CFG)
    with torch.no_grad():
        for p in (ours.router, ours.gate_up, ours.down, ours.shared_gate_up.weight, ours.shared_down.weight):
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        ours.expert_bias.copy_(0.2 * torch.randn(CFG.num_experts, generator=gen))
        hf.gate.weight.copy_(ours.router)
        hf.gate.e_score_correction_bias.copy_(ours.expert_bias)
        hf.experts.gate_up_proj.copy_(ours.gate_up)
        hf.experts.down_proj.copy_(ours.down)
        i = CFG.moe_intermediate_size
        hf.shared_experts.gate_proj.weight.copy_(ours.shared_gate_up.weight[:i])
        hf.shared_experts.up_proj.weight.copy_(ours.shared_gate_up.weight[i:])
        hf.shared_experts.down_proj.weight.copy_(ours.shared_down.weight)
    return ours, hf


@pytest.mark.parametrize("tokens", [1, 3, 16, 40])  # 4 to 160 (token, expert) pairs
def test_moe_equals_transformers_glm4_moe(tokens):
    ours, hf = pair()
    x = torch.randn(tokens, CFG.hidden_size, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x[None])[0], rtol=1e-5, atol=1e-5)


def test_routing_by_hand():
    """Two groups of two experts, one group kept, then the top experts inside it; the bias steers the choice but
    not the weight."""
    c = MoEConfig(hidden_size=1, moe_intermediate_size=1, num_experts=4, top_k=1, n_group=2, topk_group=1,
                  routed_scaling_factor=2.0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -3.0]])
    # group 0 (experts 0, 1) scores sigmoid(0) + sigmoid(1) = 1.23, group 1 sigmoid(2) + sigmoid(-3) = 0.93: group 0
    # is kept, so expert 2 (the best alone) is out; one expert is not normalised (LLaDA2 normalises when top_k > 1)
    experts, weights = route(logits, torch.zeros(4), c)
    assert experts.tolist() == [[1]]
    assert weights.tolist() == [[pytest.approx(2.0 * float(torch.sigmoid(torch.tensor(1.0))))]]
    c2 = MoEConfig(hidden_size=1, moe_intermediate_size=1, num_experts=4, top_k=2, n_group=2, topk_group=1,
                   routed_scaling_factor=1.0)
    experts, weights = route(logits, torch.zeros(4), c2)
    assert sorted(experts[0].tolist()) == [0, 1]
    experts, weights = route(logits, torch.tensor([0.0, 0.0, 0.0, 5.0]), c2)  # the bias lifts group 1 and expert 3
    assert sorted(experts[0].tolist()) == [2, 3]
    s = torch.sigmoid(torch.tensor([2.0, -3.0]))
    assert sorted(weights[0].tolist()) == pytest.approx(sorted((s / s.sum()).tolist()))
