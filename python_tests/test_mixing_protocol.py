"""The mixer protocol: misuse raises, and resume at any step reproduces the uninterrupted run exactly."""
import io

import pytest
import torch

from aioli_ext.mixing import (MIXERS, Aioli, DoReMi, LinearLawEnvironment, MixerProtocolError, MixerSettingsMismatch,
                              SkillIt, Static, Stratified, largest_remainder, mixer_from_state_dict)

F = torch.float64
INTERACTION = torch.tensor([[3.0, 0.5, -0.4], [1.0, 2.0, 0.0], [0.5, 0.2, 0.8]], dtype=F) * 1e-2

FACTORIES = {
    "aioli": lambda: Aioli(3, update_steps=25, lp_sweeps=2, lp_steps=2, one_hot=0.7, eta=0.5, seed=11),
    "aioli_ema_prior": lambda: Aioli(3, update_steps=20, lp_sweeps=1, lp_steps=3, one_hot=0.8, eta=0.5, ema=0.4,
                                     prior=[0.5, 0.3, 0.2], prior_steps=9, rounds=4, seed=2),
    "aioli_mixture_base": lambda: Aioli(3, update_steps=20, lp_sweeps=1, lp_steps=3, one_hot=0.6, lp_base="mixture",
                                        eta=0.5, prior=[0.5, 0.3, 0.2], prior_steps=9, seed=5),
    "skillit": lambda: SkillIt(3, skills_graph=torch.eye(3) + 0.1, update_steps=15, eta=0.3, window=2),
    "doremi": lambda: DoReMi(3, reference_losses=[4.0, 4.5, 4.2], update_steps=10, step_size=0.5),
    "static": lambda: Static(3, [0.2, 0.5, 0.3]),
}
NUM_STEPS = 80


def environment():
    return LinearLawEnvironment([5.0, 5.0, 5.0], INTERACTION, train_noise=1e-2, eval_noise=1e-2, seed=4)


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def run(mixer, env, stop, *, checkpoints=None):
    """The protocol loop from env.step to ``stop``; returns the proportions of each step. With ``checkpoints``
    (a dict), saves (mixer, env) states at the top of every step and, when an evaluation was observed, right
    after it."""
    rows = []
    for step in range(env.step, stop):
        if checkpoints is not None:
            checkpoints[(step, "top")] = (roundtrip(mixer.state_dict()), env.state_dict())
        if mixer.wants_eval(step):
            mixer.observe(step, env.evaluate())
            if checkpoints is not None:
                checkpoints[(step, "observed")] = (roundtrip(mixer.state_dict()), env.state_dict())
        rows.append(mixer.proportions(step))
        env.train_step(rows[-1])
    return torch.stack(rows)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_resume_at_every_step_reproduces_the_run(name):
    mixer, env, checkpoints = FACTORIES[name](), environment(), {}
    reference = run(mixer, env, NUM_STEPS, checkpoints=checkpoints)
    reference_log = mixer.log.to_dict()
    resumed_inside_learn_params = 0
    for (step, where), (mixer_state, env_state) in checkpoints.items():
        resumed = mixer_from_state_dict(mixer_state)
        resumed_env = environment()
        resumed_env.load_state_dict(env_state)
        if where == "observed":
            # Resumed between observe() and proportions(): the step's evaluation is not asked for again.
            assert not resumed.wants_eval(step)
        resumed_inside_learn_params += resumed.phase(step).label == "learn_params" if where == "observed" else 0
        trajectory = run(resumed, resumed_env, NUM_STEPS)
        assert torch.equal(trajectory, reference[step:]), f"{name}: resume at step {step} ({where}) diverged"
        assert resumed.log.to_dict() == reference_log
    if name.startswith("aioli"):
        assert resumed_inside_learn_params > 10


def test_load_state_dict_into_a_freshly_built_mixer():
    mixer, env = FACTORIES["aioli"](), environment()
    run(mixer, env, 30)
    fresh = FACTORIES["aioli"]()
    fresh.load_state_dict(roundtrip(mixer.state_dict()))
    assert fresh.next_eval_step == mixer.next_eval_step == 31
    assert fresh.phase(30).label == "learn_params" and torch.equal(fresh.proportions(30), mixer.proportions(30))


def test_load_state_dict_rejects_other_settings_and_methods():
    state = FACTORIES["aioli"]().state_dict()
    other = Aioli(3, update_steps=25, lp_sweeps=2, lp_steps=2, one_hot=0.7, eta=0.6, seed=11)
    with pytest.raises(MixerSettingsMismatch, match=r"state was saved with different aioli settings \(eta: saved 0.5 "
                                                   r"vs 0.6\)") as caught:
        other.load_state_dict(state)
    assert caught.value.differing == {"eta": (0.5, 0.6)} and isinstance(caught.value, ValueError)
    with pytest.raises(ValueError, match=r"state was saved by a 'aioli' mixer, this mixer is 'stratified'"):
        Stratified(3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state must be a dict produced by Mixer.state_dict"):
        other.load_state_dict([1, 2])
    with pytest.raises(ValueError, match=r"state must come from Mixer.state_dict\(\) of one of"):
        mixer_from_state_dict({"method": "unknown"})


def test_state_saved_before_lp_base_existed_loads_as_uniform(monkeypatch):
    state = FACTORIES["aioli"]().state_dict()
    del state["config"]["lp_base"]
    FACTORIES["aioli"]().load_state_dict(state)
    assert mixer_from_state_dict(state).lp_base == "uniform"

    # mixer_from_state_dict rebuilds it with the value it behaved as, whatever the constructor's default is.
    class AroundByDefault(Aioli):
        def __init__(self, *args, lp_base="mixture", **kwargs):
            super().__init__(*args, lp_base=lp_base, **kwargs)

    monkeypatch.setitem(MIXERS, "aioli", AroundByDefault)
    rebuilt = mixer_from_state_dict(state)
    assert isinstance(rebuilt, AroundByDefault) and rebuilt.lp_base == "uniform"
    around = Aioli(3, update_steps=25, lp_sweeps=2, lp_steps=2, one_hot=0.7, eta=0.5, seed=11, lp_base="mixture")
    with pytest.raises(MixerSettingsMismatch, match=r"\(lp_base: saved 'uniform' vs 'mixture'\)"):
        around.load_state_dict(state)


def test_misuse_raises():
    mixer = Aioli(2, update_steps=10, lp_sweeps=1, lp_steps=2)
    with pytest.raises(MixerProtocolError, match=r"no evaluation is due at step 3; the next one is due at step 0"):
        mixer.observe(3, [1.0, 1.0])
    mixer.observe(0, [1.0, 1.0])
    with pytest.raises(MixerProtocolError, match=r"no evaluation is due at step 0; the next one is due at step 2"):
        mixer.observe(0, [1.0, 1.0])
    assert not mixer.wants_eval(1)
    with pytest.raises(MixerProtocolError, match=r"evaluation is due at step 2 and has not been observed"):
        mixer.proportions(2)
    with pytest.raises(MixerProtocolError, match=r"evaluation was due at step 2 and was skipped"):
        mixer.wants_eval(3)
    mixer.observe(2, [0.9, 0.9])
    with pytest.raises(MixerProtocolError, match=r"step 1 is before the current phase \(steps 2..4\)"):
        mixer.proportions(1)
    with pytest.raises(ValueError, match=r"step must be >= 0"):
        mixer.wants_eval(-1)
    with pytest.raises(TypeError, match=r"step must be an int"):
        mixer.proportions(2.0)
    with pytest.raises(MixerProtocolError, match=r"static: no evaluation is due"):
        Static(2, [1, 1]).observe(0, [1.0, 1.0])


def test_proportions_are_the_same_for_every_micro_batch_and_a_copy():
    mixer = Static(3, [2.0, 1.0, 1.0])
    first = mixer.proportions(5)
    first[0] = 0.0
    assert torch.equal(mixer.proportions(5), torch.tensor([0.5, 0.25, 0.25], dtype=F))
    assert mixer.proportions(5).dtype == F
    assert not mixer.wants_eval(0) and mixer.next_eval_step is None


def test_static_and_stratified():
    assert torch.equal(Stratified(4).proportions(123), torch.full((4,), 0.25, dtype=F))
    with pytest.raises(ValueError, match=r"proportions must have a positive sum"):
        Static(2, [0.0, 0.0])


def test_group_counts_on_an_open_ended_phase_use_blocks():
    mixer = Static(3, [0.5, 0.3, 0.2])
    counts = torch.stack([mixer.group_counts(step, 7, block_steps=4) for step in range(8)])
    assert counts.sum(1).tolist() == [7] * 8
    for block in (counts[:4], counts[4:]):
        assert torch.equal(block.sum(0), largest_remainder([0.5, 0.3, 0.2], 28))
