"""Defaults against numbers produced by running each method's official code on the same seeded inputs (the official
lines run unmodified in a scratch directory, torch 2.13 CPU; only the numbers are kept here):

- TLM: Fhujinwu/TLM `src/llamafactory/train/ttl/trainer.py` (`compute_loss`, `cal_ce`, `cal_kl`), both settings;
- Intuitor's reward combination: sunblaze-ucb/Intuitor `open-r1-intuitor/src/open_r1/intuitor_trainer.py`
  (the lines from "Gather the reward per function" to "Log the metrics");
- RENT: satrams/rent-rl `verl/trainer/ppo/ray_trainer.py` (the "Format reward" lines, exps `entropy` + `format`)
  with verl's `entropy_from_logits`;
- DeepConf: facebookresearch/deepconf `deepconf/utils.py` (`compute_confidence` on vLLM-style top-20 log-prob
  dicts that add the sampled token when it is not among them, `calculate_bottom_window_confidence`);
- EMPO: QingyangZhang/EMPO `trl/src/open_r1/rewards.py` (`get_empo_math_reward(4)`, math-verify 0.9.0) on boxed
  completions;
- SCRL: Jasper-Yan/SCRL `verl/verl/trainer/ppo/scrl_utils.py` (`determine_pseudo_labels`) and
  `verl/verl/utils/reward_score/scrl_math/__init__.py` (`reward_func`, binary mode), defaults, on extracted answers
  (the answer extraction stubbed: each solution string is its answer, "" none, compared as strings).
"""

import pytest
import torch
import torch.nn.functional as F
from tiny import answers_only

from lightning_modules.losses.functional import entropy
from lightning_modules.losses.policy_gradient import combined_advantages
from lightning_modules.signals import ClusterShare, DeepConf, NegativeEntropy, SelectiveComplementary, Signal
from lightning_modules.tta.tlm import tlm_loss


# --------------------------------------------------------------------------------------------------------- TLM
def _tlm_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.nn.Parameter(torch.randn(3, 6, 11, generator=g) * 3)
    reference = torch.randn(3, 6, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[:, 0] = -100
    labels[2, 4:] = -100
    return logits, reference, labels


def _mean_nll(logits, labels):
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none").view(3, 5)
    at = labels[:, 1:] != -100
    return (nll * at).sum(-1) / at.sum(-1)


OFFICIAL_TLM = {  # (setting, P0) -> (loss, gradient norm over the logits); lambda 0.1
    ("online", 3.0): (7.600391864776611, 0.5409049987792969),
    ("online", 4.0): (2.7960281372070312, 0.19898784160614014),
    ("online", 10.0): (0.0, 0.0),  # nothing passes P0: loss 0, no gradient
    ("offline", 3.0): (4.688458442687988, 0.456172376871109),
    ("offline", 4.0): (1.7247873544692993, 0.1678164154291153),
    ("offline", 10.0): (0.0, 0.0),
}


@pytest.mark.parametrize("setting, threshold", list(OFFICIAL_TLM))
def test_tlm_loss_equals_the_official_trainer(setting, threshold):
    logits, reference, labels = _tlm_inputs()
    ce = _mean_nll(logits, labels)
    select = ce.detach() if setting == "online" else _mean_nll(reference, labels)
    loss, mask = tlm_loss(ce, select, threshold=threshold, scale=0.1)
    loss.backward()
    want_loss, want_grad = OFFICIAL_TLM[(setting, threshold)]
    assert loss.item() == pytest.approx(want_loss, rel=1e-6, abs=1e-7)
    assert logits.grad.norm().item() == pytest.approx(want_grad, rel=1e-5, abs=1e-7)


def test_tlm_makes_no_step_and_counts_it_when_nothing_passes():
    from lightning_modules.tta import TLM

    w = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1)

    class View:
        policy = None

        def predictions(self):
            return None

        def input_nll(self):
            return w * torch.tensor([1.0, 2.0])

    method = TLM(reference="online")
    _, metrics = method.adapt(View(), optimizer)
    assert w.tolist() == [1.0, 1.0] and method.no_update_steps == 1 and metrics["no_update"].item() == 1.0
    assert metrics["loss"].item() == 0.0 and method.run_state()["no_update_steps"] == 1


# ----------------------------------------------------------------------------------------- Intuitor's combination
OFFICIAL_INTUITOR = {  # self-certainty weighted 1, then the weights of the other rewards -> advantages
    (1.0,): [0.396409, 1.028573, -1.682594, 0.257613, -0.88102, -0.524096, -0.486741, 1.891857],
    (2.0,): [0.396359, 1.028723, -1.682644, 0.257563, -0.881095, -0.524171, -0.486666, 1.891932],
    (1.0, 1.0): [0.896309, -0.471127, -1.182694, 0.757513, -0.88102, -0.524096, -0.486741, 1.891857],
    (2.0, 0.5): [0.396375, 1.028673, -1.682628, 0.257579, -0.881095, -0.524171, -0.486666, 1.891932],
}


@pytest.mark.parametrize("weights", list(OFFICIAL_INTUITOR))
def test_normalize_each_equals_intuitors_combination(weights):
    certainty = torch.randn(8, generator=torch.Generator().manual_seed(1))
    others = torch.randint(0, 2, (8, 2), generator=torch.Generator().manual_seed(2)).float()[:, : len(weights)]
    rewards, group = torch.cat([certainty[:, None], others], 1), torch.arange(8) // 4
    got = combined_advantages(rewards, [1.0, *weights], [True] + [False] * len(weights), group)
    assert got.tolist() == pytest.approx(OFFICIAL_INTUITOR[weights], abs=2e-6)
    if weights == (2.0,):  # normalising every reward on its own (ours, `normalize_every_reward`) is another method
        every = combined_advantages(rewards, [1.0, *weights], [True, True], group)
        assert (every - got).abs().max() > 0.5


# ------------------------------------------------------------------------------------------------------- RENT
OFFICIAL_RENT_ENTROPY = [[1.522141, 1.1082, 1.001482, 0.8562, 1.809546],
                         [1.489264, 0.869403, 1.777133, 1.290051, 0.504913],
                         [0.735684, 1.591903, 0.194384, 0.545779, 1.200365],
                         [1.609828, 0.604486, 1.616602, 2.041444, 1.736811]]
OFFICIAL_RENT_REWARD = [-1.2595138549804688, -7.0, -0.7669375538825989, -7.0]  # answers "4", none, "7", none


def test_negative_entropy_equals_rents_reward(monkeypatch):
    import lightning_modules.signals.confidence as confidence

    logits = torch.randn(4, 5, 13, generator=torch.Generator().manual_seed(3)) * 2
    token_entropy = entropy(logits)
    assert token_entropy.tolist() == [pytest.approx(row, abs=5e-6) for row in OFFICIAL_RENT_ENTROPY]
    lengths = [5, 3, 4, 2]
    monkeypatch.setattr(confidence, "response_values",
                        lambda *args: [token_entropy[i, :n] for i, n in enumerate(lengths)])
    got = NegativeEntropy().forward(answers_only([["4", None, "7", None]]), None)
    assert got.tolist() == pytest.approx(OFFICIAL_RENT_REWARD, abs=5e-6)


# ---------------------------------------------------------------------------------------------------- DeepConf
OFFICIAL_DEEPCONF_CONFS = [  # rounded to 3 decimals by the official code; 31 of 40 positions hold 21 values
    4.204, 4.268, 3.498, 3.69, 3.489, 3.589, 3.836, 4.329, 4.043, 5.048, 3.738, 3.987, 3.697, 3.339, 4.041, 3.627,
    3.605, 3.577, 3.582, 3.805, 3.986, 5.064, 3.821, 3.493, 4.001, 4.012, 3.517, 3.818, 4.229, 3.603, 4.096, 4.016,
    3.878, 3.44, 3.518, 3.634, 3.57, 3.613, 3.576, 3.808]
OFFICIAL_DEEPCONF_SCORES = {  # (window, reduce, bottom_percent) -> trace score
    (8, "bottom", 0.1): 3.648125, (3, "bottom", 0.2): 3.5757619047619036, (8, "lowest", 0.1): 3.629625,
    (64, "bottom", 0.1): 3.842125,  # shorter than the window: the mean
}


def test_deepconf_with_the_sampled_token_equals_the_official_confidences():
    g = torch.Generator().manual_seed(4)
    log_p = (torch.randn(40, 60, generator=g) * 2).log_softmax(-1)
    sampled = torch.randint(0, 60, (40,), generator=g)
    signal = DeepConf(include_sampled=True)
    confidence = signal.token_confidence(signal.top_logprobs(log_p), log_p[torch.arange(40), sampled])
    assert confidence.tolist() == pytest.approx(OFFICIAL_DEEPCONF_CONFS, abs=5.1e-4)
    for (window, reduce, percent), want in OFFICIAL_DEEPCONF_SCORES.items():
        signal = DeepConf(window=window, reduce=reduce, bottom_percent=percent)
        assert signal.trace_score(torch.tensor(OFFICIAL_DEEPCONF_CONFS)) == pytest.approx(want, abs=1e-5)
    exact_k = DeepConf().token_confidence(signal.top_logprobs(log_p))
    assert (exact_k - confidence).abs().max() > 0.1  # the default (exactly k) is a deviation, named


# -------------------------------------------------------------------------------------------------------- EMPO
OFFICIAL_EMPO = [  # boxed answers (None: no box) -> official rewards
    (["1", None, None, "2"], [0.0, 0.0, 0.0, 0.0]),  # each unparsable answer its own cluster: all different
    (["3", "3", None, None], [0.5, 0.5, 0.0, 0.0]),
    (["5", "5", "5", "7"], [0.75, 0.75, 0.75, 0.25]),
    (["4", "6", "8", "9"], [0.0, 0.0, 0.0, 0.0]),
    ([None, None, None, None], [0.0, 0.0, 0.0, 0.0]),
]


def test_cluster_share_equals_empos_reward():
    got = ClusterShare()(answers_only([answers for answers, _ in OFFICIAL_EMPO]), None)
    assert got.tolist() == [r for _, rewards in OFFICIAL_EMPO for r in rewards]
    # the named deviation: "0.5" and "\frac{1}{2}" are one cluster here (the task's equivalence); the official
    # code compares the extracted strings and gives the group [0.5, 1/2, 2, none] 0 0 0 0
    deviation = ClusterShare()(answers_only([["0.5", "1/2", "2", None]]), None)
    assert deviation.tolist() == [0.5, 0.5, 0.25, 0.0]


# -------------------------------------------------------------------------------------------------------- SCRL
OFFICIAL_SCRL = [  # (answers, each sample's mean token entropy) -> official rewards (positive, negative set)
    (["5", "5", "5", "5", "5", "7", "9", None], [0.2, 0.3, 0.25, 0.2, 0.3, 0.9, 0.1, 1.2],
     [1, 1, 1, 1, 1, -1, 0, -1]),  # "5" positive; "7" rare and unsure: negative; "9" rare but sure
    (["5", "5", "5", "5", "7", "7", "7", "9"], [0.2, 0.3, 0.2, 0.2, 0.5, 0.6, 0.4, 0.8],
     [0, 0, 0, 0, 0, 0, 0, -1]),  # 0.5 against 0.375: margin 0.125, no positive; negatives still
    (["5", "5", "5", "7", "7", "9", "11", None], [0.3, 0.3, 0.3, 0.4, 0.4, 0.9, 0.2, 0.5],
     [0, 0, 0, 0, 0, -1, 0, -1]),  # top share 0.375 < 0.5
    ([None] * 8, [0.5] * 8, [-1] * 8),
    (["3"] * 8, [0.4] * 8, [1] * 8),
    (["3"] * 6 + [None] * 2, [0.4] * 6 + [0.1] * 2, [1] * 6 + [-1] * 2),  # the only parsed answer, 0.75
    ([str(2 * i) for i in range(1, 9)], [0.1 * i for i in range(1, 9)], [0, 0, 0, 0, -1, -1, -1, -1]),
    (["5"] * 6 + ["7", "8"], [0.5] * 7 + [0.4], [1] * 6 + [-1, 0]),
    (["5"] * 10 + ["7"] * 7 + ["9"] * 2 + ["11"], [0.3] * 10 + [0.4] * 7 + [0.5, 0.6, 0.35],
     [1] * 10 + [0] * 7 + [-1, -1, 0]),  # G = 20: margin 0.5 - 0.35 is just above 0.15 in float64, as officially
]


class _Fixed(Signal):
    judge, higher_is_better = "none", False

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values)

    def forward(self, candidates, policy):
        return self.values


def test_selective_complementary_equals_scrls_reward():
    entropies = [h for _, hs, _ in OFFICIAL_SCRL for h in hs]
    signal = SelectiveComplementary(_Fixed(entropies))
    got = signal(answers_only([answers for answers, _, _ in OFFICIAL_SCRL]), None)
    assert got.tolist() == [r for _, _, rewards in OFFICIAL_SCRL for r in rewards]
    # the same from the confidence instead of the entropy (higher is better): the gate flips with it
    negated = _Fixed([-h for h in entropies])
    negated.higher_is_better = True
    assert SelectiveComplementary(negated)(answers_only([a for a, _, _ in OFFICIAL_SCRL]), None).equal(got)
