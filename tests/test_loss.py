"""grpo_loss against TRL 1.16 (fixture and live) and on hand-made edge cases."""

import functools
import json
import pathlib

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import loss
from grpo_jax.errors import UserError

GOLDEN = json.loads(
    (pathlib.Path(__file__).parent / "data" / "trl_golden.json").read_text())
# The Python-valued options of grpo_loss, as the fixture records them.
OPTIONS = ("loss_type", "beta", "epsilon_low", "epsilon_high", "delta",
           "importance_sampling_level", "max_completion_length")
TOL = 1e-5


def _case_id(result):
  c = result["case"]
  return "-".join(str(c[k]) for k in ("loss_type", "beta", "epsilon_high",
                                      "importance_sampling_level", "delta", "seed"))


@functools.partial(jax.jit, static_argnames=OPTIONS)
def _jit_loss_and_grad(logps, old_logps, ref_logps, advs, mask, **options):
  fn = lambda x: loss.grpo_loss(x, old_logps, ref_logps, advs, mask, **options)
  return jax.value_and_grad(fn, has_aux=True)(logps)


def _loss_and_grad(inputs, **options):
  """(value, aux, d value / d logps) of grpo_loss on numpy inputs."""
  (value, aux), grad = _jit_loss_and_grad(
      *(inputs[k] for k in ("logps", "old_logps", "ref_logps", "advs", "mask")), **options)
  return value, aux, np.asarray(grad)


def _check_against(result, value, aux, grad):
  np.testing.assert_allclose(value, result["loss"], atol=TOL, rtol=0)
  np.testing.assert_allclose(grad, np.asarray(result["grad"]), atol=TOL, rtol=0)
  for name, expected in result["metrics"].items():
    np.testing.assert_allclose(aux[name], expected, atol=TOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("result", GOLDEN["results"], ids=_case_id)
def test_matches_trl_fixture(result):
  inputs = {k: None if v is None else np.asarray(v)
            for k, v in GOLDEN["inputs"][str(result["case"]["seed"])].items()}
  inputs["logps"] = inputs["logps"].astype(np.float32)
  value, aux, grad = _loss_and_grad(inputs, **{k: result["case"][k] for k in OPTIONS})
  _check_against(result, value, aux, grad)


def test_fixture_covers_both_clip_sides():
  for level in ("token", "sequence"):
    metrics = [r["metrics"] for r in GOLDEN["results"]
               if r["case"]["importance_sampling_level"] == level]
    assert max(m["clip_ratio/low_mean"] for m in metrics) > 0
    assert max(m["clip_ratio/high_mean"] for m in metrics) > 0


@pytest.fixture(scope="module")
def trl_checkpoint(tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("trl")
  from tests import make_trl_golden
  workdir = str(tmp_path_factory.mktemp("trl"))
  return workdir, make_trl_golden.make_checkpoint(workdir)


@pytest.mark.parametrize("seed,case,num_items", [
    (101, dict(loss_type="grpo", beta=0.04, epsilon_high=None,
               importance_sampling_level="token", delta=None), None),
    (102, dict(loss_type="dr_grpo", beta=0.0, epsilon_high=0.28,
               importance_sampling_level="sequence", delta=None), None),
    (103, dict(loss_type="dapo", beta=0.04, epsilon_high=0.28,
               importance_sampling_level="token", delta=1.3), 57.0),
    (104, dict(loss_type="bnpo", beta=0.1, epsilon_high=0.28,
               importance_sampling_level="sequence", delta=2.0), None),
])
def test_matches_trl_live(trl_checkpoint, seed, case, num_items):
  from tests import make_trl_golden
  workdir, checkpoint = trl_checkpoint
  inputs = make_trl_golden.make_inputs(seed, rows=8, tokens=11)
  case = dict(case, epsilon_low=0.15, max_completion_length=11)
  trainer = make_trl_golden.make_trainer(case, checkpoint, workdir, rows=8)
  expected_loss, metrics, expected_grad = make_trl_golden.trl_loss(trainer, inputs, num_items)
  options = {k: case[k] for k in OPTIONS if k != "max_completion_length"}  # default T
  value, aux, grad = _loss_and_grad(inputs, num_items_in_batch=num_items, **options)
  _check_against({"loss": expected_loss, "grad": expected_grad, "metrics": metrics},
                 value, aux, grad)


def test_high_entropy_mask_matches_trl(trl_checkpoint):
  """TRL's GRPOTrainer.get_high_entropy_mask (one process) on entropies with ties, for
  top_entropy_quantile q (TRL passes the threshold 1 - q), and on an empty mask."""
  import torch
  from tests import make_trl_golden
  workdir, checkpoint = trl_checkpoint
  case = dict(loss_type="grpo", beta=0.0, epsilon_low=0.2, epsilon_high=None, delta=None,
              importance_sampling_level="token", max_completion_length=9)
  trainer = make_trl_golden.make_trainer(case, checkpoint, workdir, rows=6)
  entropies = np.random.default_rng(3).exponential(1.0, (6, 9)).round(1).astype(np.float32)
  mask = make_trl_golden.make_inputs(3, rows=6, tokens=9)["mask"]
  for quantile in (0.0, 0.2, 0.5, 0.7, 1.0):
    for m in (mask, np.zeros_like(mask)):
      want = trainer.get_high_entropy_mask(torch.tensor(entropies), torch.tensor(m),
                                           1 - quantile).numpy()
      got = loss.high_entropy_mask(entropies, m, quantile)
      np.testing.assert_array_equal(got, want, err_msg=f"quantile {quantile}")
      assert (not m.any()) or 0 < got.sum() <= m.sum()


@pytest.mark.parametrize("seed,case", [
    (111, dict(loss_type="grpo", beta=0.04, epsilon_high=0.28,
               importance_sampling_level="token", delta=None)),
    (112, dict(loss_type="dapo", beta=0.04, epsilon_high=None,
               importance_sampling_level="sequence", delta=None)),
])
def test_policy_mask_is_trls_top_entropy_quantile_live(trl_checkpoint, seed, case):
  """TRL's _compute_loss with top_entropy_quantile = 0.4 equals grpo_loss with the policy
  mask of high_entropy_mask: value, gradient and metrics (the KL term and the normalisers
  still count every token)."""
  from tests import make_trl_golden
  workdir, checkpoint = trl_checkpoint
  inputs = make_trl_golden.make_inputs(seed, rows=8, tokens=11)
  entropies = np.random.default_rng(seed).exponential(1.0, (8, 11)).astype(np.float32)
  case = dict(case, epsilon_low=0.15, max_completion_length=11)
  trainer = make_trl_golden.make_trainer(case, checkpoint, workdir, rows=8)
  trainer.top_entropy_quantile = 0.4
  expected_loss, metrics, expected_grad = make_trl_golden.trl_loss(
      trainer, dict(inputs, entropies=entropies))
  policy_mask = loss.high_entropy_mask(entropies, inputs["mask"], 0.4)
  assert 0 < policy_mask.sum() < inputs["mask"].sum()
  options = {k: case[k] for k in OPTIONS if k != "max_completion_length"}
  value, aux, grad = _loss_and_grad(inputs, policy_mask=policy_mask, **options)
  _check_against({"loss": expected_loss, "grad": expected_grad, "metrics": metrics},
                 value, aux, grad)
  unmasked, _, _ = _loss_and_grad(inputs, **options)
  assert abs(float(unmasked) - float(value)) > 1e-4  # the mask changed the loss


def _inputs(seed=0, rows=4, tokens=5):
  rng = np.random.default_rng(seed)
  logps = -rng.exponential(1.0, (rows, tokens)).astype(np.float32)
  return {
      "logps": logps,
      "old_logps": logps + rng.normal(0, 0.3, logps.shape).astype(np.float32),
      "ref_logps": logps + rng.normal(0, 0.3, logps.shape).astype(np.float32),
      "advs": rng.normal(0, 1, rows).astype(np.float32),
      "mask": np.ones((rows, tokens), np.float32),
  }


@pytest.mark.parametrize("loss_type", loss.LOSS_TYPES)
def test_all_masked_row_adds_nothing(loss_type):
  inputs = _inputs()
  inputs["mask"][0] = 0.0
  options = dict(loss_type=loss_type, beta=0.04, max_completion_length=5,
                 num_items_in_batch=float(inputs["mask"].sum()))
  value, aux, grad = _loss_and_grad(inputs, **options)
  np.testing.assert_array_equal(grad[0], 0.0)
  rest = {k: v[1:] for k, v in inputs.items()}
  rest_value, rest_aux, rest_grad = _loss_and_grad(rest, **options)
  # grpo and dr_grpo average over every row, the empty one included.
  scale = 3 / 4 if loss_type in ("grpo", "dr_grpo") else 1.0
  np.testing.assert_allclose(value, scale * rest_value, atol=1e-6)
  np.testing.assert_allclose(grad[1:], scale * rest_grad, atol=1e-6)
  np.testing.assert_allclose(aux["kl"], rest_aux["kl"], atol=1e-6)


def test_on_policy_gradient_is_advantage_over_length():
  """old_logps None: ratio 1, loss -mean_b(A_b), d/d logp_bt = -A_b / (B len_b)."""
  inputs = _inputs(rows=3)
  inputs["old_logps"] = None
  inputs["mask"] = np.array([[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  value, aux, grad = _loss_and_grad(inputs)
  advs = inputs["advs"]
  np.testing.assert_allclose(value, -advs.mean(), rtol=1e-6)
  lengths = inputs["mask"].sum(1, keepdims=True)
  np.testing.assert_allclose(grad, -advs[:, None] * inputs["mask"] / (3 * lengths), rtol=1e-6)
  assert float(aux["clip_ratio/region_mean"]) == 0.0


def test_zero_advantages_give_zero_loss_and_gradient():
  inputs = _inputs()
  inputs["advs"] = np.zeros(4, np.float32)
  value, _, grad = _loss_and_grad(inputs)
  assert float(value) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_beta_zero_needs_no_reference():
  inputs = _inputs()
  with_ref = _loss_and_grad(inputs)
  inputs["ref_logps"] = None
  value, aux, grad = _loss_and_grad(inputs)
  np.testing.assert_array_equal(value, with_ref[0])
  np.testing.assert_array_equal(grad, with_ref[2])
  assert float(aux["kl"]) == 0.0


def test_beta_without_reference_is_an_error():
  inputs = _inputs()
  inputs["ref_logps"] = None
  with pytest.raises(ValueError, match="ref_logps"):
    _loss_and_grad(inputs, beta=0.04)


@pytest.mark.parametrize("options,allowed", [
    (dict(loss_type="ppo"), "grpo, bnpo, dr_grpo, dapo"),
    (dict(importance_sampling_level="row"), "token, sequence"),
])
def test_unknown_names_list_the_allowed_ones(options, allowed):
  with pytest.raises(UserError, match=allowed):
    _loss_and_grad(_inputs(), **options)


def test_gradient_is_exactly_zero_where_clipped():
  inputs = _inputs(rows=4, tokens=2)
  inputs["logps"] = np.full((4, 2), -1.0, np.float32)
  # Log-ratios +5 / -5 with advantages +1 / -1: rows 0 and 3 are clipped.
  inputs["old_logps"] = inputs["logps"] - np.array([[5], [5], [-5], [-5]], np.float32)
  inputs["advs"] = np.array([1, -1, 1, -1], np.float32)
  value, aux, grad = _loss_and_grad(inputs, epsilon_high=0.28)
  np.testing.assert_array_equal(grad[[0, 3]], 0.0)
  assert np.all(grad[[1, 2]] != 0.0)
  np.testing.assert_allclose(aux["clip_ratio/low_mean"], 0.25)
  np.testing.assert_allclose(aux["clip_ratio/high_mean"], 0.25)
  np.testing.assert_allclose(aux["clip_ratio/region_mean"], 0.5)
  ratio = np.exp(5.0)
  expected = np.mean([-1.28, ratio, -np.exp(-5.0), 0.8])
  np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_delta_caps_the_unclipped_ratio():
  inputs = _inputs(rows=1, tokens=3)
  inputs["old_logps"] = inputs["logps"] - 3.0  # ratio e^3
  inputs["advs"] = np.array([-2.0], np.float32)
  value, _, grad = _loss_and_grad(inputs, delta=1.5)
  np.testing.assert_allclose(value, 1.5 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(grad, 0.0)
  uncapped, _, _ = _loss_and_grad(inputs)
  np.testing.assert_allclose(uncapped, np.exp(3.0) * 2.0, rtol=1e-5)


@pytest.mark.parametrize("level", loss.IS_LEVELS)
def test_row_and_token_advantages_agree(level):
  inputs = _inputs(seed=3)
  inputs["mask"][1, 3:] = 0
  row = _loss_and_grad(inputs, importance_sampling_level=level, beta=0.04)
  inputs["advs"] = np.repeat(inputs["advs"][:, None], 5, axis=1)
  per_token = _loss_and_grad(inputs, importance_sampling_level=level, beta=0.04)
  np.testing.assert_allclose(per_token[0], row[0], rtol=1e-6)
  np.testing.assert_allclose(per_token[2], row[2], rtol=1e-6)


def test_masked_garbage_does_not_leak():
  inputs = _inputs()
  inputs["mask"][:, -1] = 0.0
  clean = _loss_and_grad(inputs, beta=0.04)
  for name in ("logps", "old_logps", "ref_logps"):
    inputs[name][:, -1] = -np.inf if name == "logps" else np.nan
  value, aux, grad = _loss_and_grad(inputs, beta=0.04)
  np.testing.assert_allclose(value, clean[0], rtol=1e-6)
  np.testing.assert_allclose(grad, clean[2], rtol=1e-6)
  assert np.isfinite(float(aux["kl"]))


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.int32, jnp.float32])
def test_mask_dtypes_and_low_precision_inputs(dtype):
  inputs = _inputs()
  inputs["mask"][2, 2:] = 0
  expected = _loss_and_grad(inputs, beta=0.04)
  mask = jnp.asarray(inputs["mask"]).astype(dtype)
  value, aux = jax.jit(lambda m: loss.grpo_loss(
      jnp.asarray(inputs["logps"]), inputs["old_logps"], inputs["ref_logps"],
      inputs["advs"], m, beta=0.04))(mask)
  np.testing.assert_allclose(value, expected[0], rtol=1e-6)
  assert value.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in aux.values())
  bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inputs.items()}
  low, _ = loss.grpo_loss(*(bf16[k] for k in ("logps", "old_logps", "ref_logps",
                                               "advs", "mask")), beta=0.04)
  assert low.dtype == jnp.float32


_SETTINGS = hypothesis.settings(max_examples=20, deadline=None)


@st.composite
def _batches(draw):
  rows = draw(st.integers(1, 4))
  tokens = draw(st.integers(1, 6))
  logp = hnp.arrays(np.float32, (rows, tokens), elements=st.floats(-4, 0, width=32))
  return {
      "logps": draw(logp),
      "old_logps": draw(logp),
      "ref_logps": draw(logp),
      "advs": draw(hnp.arrays(np.float32, rows, elements=st.floats(-2, 2, width=32))),
      "mask": draw(hnp.arrays(np.int32, (rows, tokens), elements=st.integers(0, 1))),
  }


@_SETTINGS
@hypothesis.given(batch=_batches(), pad=st.integers(1, 3),
                  loss_type=st.sampled_from(loss.LOSS_TYPES),
                  level=st.sampled_from(loss.IS_LEVELS))
def test_padding_width_does_not_change_the_loss(batch, pad, loss_type, level):
  options = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                 max_completion_length=8)
  value, aux, grad = _loss_and_grad(batch, **options)
  padded = {k: v if v.ndim == 1 else np.pad(v, ((0, 0), (0, pad)), constant_values=-1)
            for k, v in batch.items()}
  padded["mask"][:, -pad:] = 0
  p_value, p_aux, p_grad = _loss_and_grad(padded, **options)
  np.testing.assert_allclose(p_value, value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p_grad[:, :-pad], grad, rtol=1e-5, atol=1e-6)
  for name in aux:
    np.testing.assert_allclose(p_aux[name], aux[name], rtol=1e-5, atol=1e-6)


@_SETTINGS
@hypothesis.given(batch=_batches(), level=st.sampled_from(loss.IS_LEVELS))
def test_dapo_with_token_count_is_bnpo(batch, level):
  bnpo, _, bnpo_grad = _loss_and_grad(batch, loss_type="bnpo", importance_sampling_level=level)
  dapo, _, dapo_grad = _loss_and_grad(batch, loss_type="dapo", importance_sampling_level=level,
                                      num_items_in_batch=batch["mask"].sum())
  np.testing.assert_allclose(dapo, bnpo, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(dapo_grad, bnpo_grad, rtol=1e-6, atol=1e-7)
