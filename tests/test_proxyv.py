"""ProxyV: mask semantics, training and adapters, the layer written out. Identity at layer=num_layers
and cached decoding of every variant run for every family in ``test_families.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmmsqueeze
from lmmsqueeze.errors import ModelError, PipelineError
from lmmsqueeze.proxyv import ProxyVAdapter
from lmmsqueeze.proxyv.attach import config_for
from lmmsqueeze.testing import tiny_inputs, tiny_llava


@pytest.mark.parametrize("pipeline, p", [
    ("proxyv(layer=3, factor=2)", 9),  # 6x6 grid / factor 2 = 3x3 proxies
    ("proxyv(layer=3, variant=nonspatial, proxies=12)", 12),
])
def test_mask_semantics_on_the_attention_inputs(tiny_sdpa, monkeypatch, pipeline, p):
    """Capture what a ProxyV layer hands to attention and check every block against the rules,
    computed independently from token kinds and positions: no proxy sees the text after its image. (More
    proxies than image tokens are refused by the compiler.)"""
    model, processor = tiny_sdpa
    inputs = tiny_inputs(processor, 2)
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape, k.shape, attn_mask))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    real = inputs["attention_mask"].bool()
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), lmmsqueeze.apply(model, pipeline):
        model(**inputs, position_ids=positions)
    ours = [s for s in seen if s[2] is not None and s[2].dtype == torch.bool and s[0][2] != s[1][2]]
    assert len(ours) >= 2, "the ProxyV layer did not call attention twice (proxies, then other tokens)"
    (pq, pk, proxy_mask), (tq, tk, text_mask) = ours[:2]
    n_seq = inputs["input_ids"].shape[1]
    image = inputs["input_ids"] == model.config.image_token_id
    t = int((~image[0]).sum())
    # the proxies' call: p queries over [proxies; the t other tokens]; the others' call: t over the sequence
    assert (pq[2], pk[2], tq[2], tk[2]) == (p, p + t, t, n_seq)
    # the dense mask over [sequence; proxies] that the two calls compute: a key a call leaves out is unseen
    mask = torch.zeros(2, 1, p + t, n_seq + p, dtype=torch.bool)
    for b in range(2):
        others = torch.nonzero(~image[b]).flatten()
        mask[b, 0, :p, n_seq:] = proxy_mask[b, 0, :, :p]
        mask[b, 0, :p, others] = proxy_mask[b, 0, :, p:]
        mask[b, 0, p:, :n_seq] = text_mask[b, 0]
    for b in range(2):
        others = torch.nonzero(~image[b]).flatten()
        first_image = int(positions[b][image[b]].min())
        kinds = ["proxy"] * p + ["text"] * len(others)  # query order: proxies, then every other token
        q_pos = [first_image + i for i in range(p)] + positions[b, others].tolist()
        q_row = list(range(n_seq, n_seq + p)) + others.tolist()
        k_kind = ["image" if image[b, j] else "text" for j in range(n_seq)] + ["proxy"] * p
        k_pos = positions[b].tolist() + [first_image + i for i in range(p)]
        k_real = real[b].tolist() + [True] * p
        for qi in range(len(kinds)):
            for kj in range(n_seq + p):
                expected = k_pos[kj] <= q_pos[qi] and k_real[kj]
                if kinds[qi] == "proxy" and k_kind[kj] == "image":
                    expected = False
                if kinds[qi] == "proxy" and k_kind[kj] == "text" and k_pos[kj] >= first_image:
                    expected = False  # text after the image
                if kinds[qi] == "text" and k_kind[kj] == "proxy":
                    expected = False
                expected = expected or kj == q_row[qi]
                assert bool(mask[b, 0, qi, kj]) == expected, (b, qi, kj)
        # text after the image sees every image token; proxies see none
        last = len(kinds) - 1
        assert bool(mask[b, 0, last, :n_seq][image[b]].all())
        assert not bool(mask[b, 0, :p, :n_seq][:, image[b]].any())


def test_frozen_llm_gradients_reach_only_proxyv_parameters(tiny_sdpa):
    model, processor = tiny_sdpa
    inputs = tiny_inputs(processor, 2)
    plan = lmmsqueeze.compile("proxyv(layer=1, variant=nonspatial, proxies=4)", model)
    adapter = ProxyVAdapter(config_for(model, plan))
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with lmmsqueeze.apply(model, plan, weights=adapter):
            loss = model(**inputs).logits.float().pow(2).mean()
        loss.backward()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    grads = {name: p.grad for name, p in adapter.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not g.abs().sum()]


def test_adapter_round_trip_gives_identical_logits(tiny_sdpa, tmp_path):
    model, processor = tiny_sdpa
    inputs = tiny_inputs(processor, 1)
    plan = lmmsqueeze.compile("pool | proxyv(layer=2, variant=nonspatial, proxies=3)", model)
    torch.manual_seed(1)
    adapter = ProxyVAdapter(config_for(model, plan))
    adapter.save(tmp_path / "adapter")
    with torch.no_grad():
        with lmmsqueeze.apply(model, plan, weights=adapter):
            a = model(**inputs).logits
        with lmmsqueeze.apply(model, plan, weights=str(tmp_path / "adapter")):
            b = model(**inputs).logits
        with lmmsqueeze.apply(model, plan):  # fresh weights differ
            c = model(**inputs).logits
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_adapter_mismatch_is_named(tiny_sdpa, tmp_path):
    model, _ = tiny_sdpa
    plan = lmmsqueeze.compile("proxyv(layer=2, factor=2)", model)
    ProxyVAdapter(config_for(model, plan)).save(tmp_path / "a")
    with pytest.raises(ModelError, match="layer: the adapter has 2, the pipeline/model needs 1"):
        with lmmsqueeze.apply(model, "proxyv(layer=1, factor=2)", weights=str(tmp_path / "a")):
            pass
    with pytest.raises(ModelError, match="variant: the adapter has spatial"):
        with lmmsqueeze.apply(model, "proxyv(layer=2, variant=nonspatial, proxies=4)",
                              weights=str(tmp_path / "a")):
            pass
    other, _ = tiny_llava(hidden=32, heads=2, kv_heads=1, ffn=64)
    with pytest.raises(ModelError, match="hidden_size: the adapter has 64, the pipeline/model needs 32"):
        with lmmsqueeze.apply(other, "proxyv(layer=2, factor=2)", weights=str(tmp_path / "a")):
            pass


@pytest.mark.parametrize("pipeline, message", [
    ("random(keep=0.5) | proxyv(layer=2)",
     "needs the token grid, but an earlier stage broke it; use variant=nonspatial"),
    ("fastv(layer=2) | proxyv(layer=2)",
     "an llm reducer at layer 2 >= 2 cannot run with ProxyV from layer 2"),
    ("proxyv(layer=1) | fastv(layer=2)", "an llm reducer at layer 2 >= 1 cannot run with ProxyV"),
    ("proxyv(layer=2) | fastv(layer=1)", "cannot follow a proxyv stage"),
    ("proxyv(layer=5)", "ProxyV starts at a layer in 0..4"),
    ("proxyv(variant=diagonal)", "variant='diagonal' is not a valid one of spatial|nonspatial"),
    ("proxyv(layer=2) | proxyv(layer=3)", "at most one proxyv stage"),
])
def test_refusals(tiny_sdpa, pipeline, message):
    with pytest.raises(PipelineError) as err:
        lmmsqueeze.compile(pipeline, tiny_sdpa[0])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_train_proxyv_runs_resumes_and_the_adapter_alone_is_enough(tmp_path):
    import json

    from typer.testing import CliRunner

    from lmmsqueeze.cli import app

    model, processor = tiny_llava()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    from lmmsqueeze.testing import random_image

    random_image(2).save(tmp_path / "i.png")
    runner = CliRunner()
    args = ["train-proxyv", "-m", str(tmp_path / "m"),
            "-p", "pool | proxyv(layer=2, variant=nonspatial, proxies=3)",
            "--out", str(tmp_path / "out"), "--batch", "3", "--eval-every", "2", "--eval-size", "4",
            "--save-every", "2"]
    first = runner.invoke(app, [*args, "--steps", "2"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [*args, "--steps", "4"])  # resumes at step 2
    assert second.exit_code == 0, second.output
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all("val_accuracy" in r for r in log if r["step"] % 2 == 0)
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["pipeline"] == ("pool(size=2) | "
                                  "proxyv(factor=4, layer=2, mlp_hidden=0, proxies=3, variant=nonspatial)")
    ran = runner.invoke(app, ["run", "-m", str(tmp_path / "m"), "-i", str(tmp_path / "i.png"),
                              "--prompt", "what ?", "--adapter", str(tmp_path / "out" / "adapter"),
                              "--max-new-tokens", "2", "--json"])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.stdout)["pipeline"] == config["pipeline"]
    bad = runner.invoke(app, ["run", "-m", str(tmp_path / "m"), "-i", str(tmp_path / "i.png"),
                              "--prompt", "what ?", "--adapter", str(tmp_path / "out" / "adapter"),
                              "-p", "proxyv(layer=1)"])
    assert bad.exit_code == 2 and "does not fit this pipeline or model" in bad.stderr


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("variant", ["spatial", "nonspatial"])
def test_the_proxyv_layer_is_the_papers_computation_written_out(variant, images):
    """One ProxyV layer (the last one) on the tiny eager LLaVA against the method written out from
    the weights, image by image: each image's proxies (bilinear 6x6 -> 3x3, or the initializer's
    softmax pooling) take consecutive positions from that image's start; attention of proxies + text
    over image + proxies + text under the paper's mask rules (built here by loops: a proxy sees the
    proxies and the text before its own image); the FFN on the queries only; and every image token's
    VisionMLP update from its proxy."""
    from lmmsqueeze.proxyv.attach import config_for
    from lmmsqueeze.testing import random_image

    model, processor = tiny_llava(attn="eager")
    if images == 1:
        inputs = tiny_inputs(processor, 1)
    else:
        inputs = processor(images=[random_image(0), random_image(1)], return_tensors="pt",
                           text="USER: <image>\nwhat is <image>\nthe colour ? ASSISTANT:")
    lm = model.model.language_model
    layer = lm.layers[3]
    pipeline = ("proxyv(layer=3, factor=2)" if variant == "spatial"
                else "proxyv(layer=3, variant=nonspatial, proxies=4)")
    plan = lmmsqueeze.compile(pipeline, model)
    adapter = ProxyVAdapter(config_for(model, plan))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():  # random weights everywhere, so every term matters
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    seen = {}
    with torch.no_grad():
        handle = lm.layers[2].register_forward_hook(lambda m, a, kw, out: seen.update(x=out[0]),
                                                    with_kwargs=True)
        model(**inputs)
        handle.remove()
        with lmmsqueeze.apply(model, plan, weights=adapter):
            handle = lm.layers[3].register_forward_hook(lambda m, a, kw, out: seen.update(y=out[0]),
                                                        with_kwargs=True)
            model(**inputs)
            handle.remove()

        x = seen["x"]  # [N, d] entering layer 3 (the same with and without ProxyV below it)
        ids = inputs["input_ids"][0]
        image = torch.nonzero(ids == model.config.image_token_id).flatten()
        text = torch.nonzero(ids != model.config.image_token_id).flatten()
        n_seq, d = ids.numel(), x.shape[-1]
        mlp = adapter.mlps[0]
        proxies, spreads, positions, owner_of = [], [], [], []
        for j in range(images):  # each image alone: its 36 tokens, its proxies, its start position
            cols = image[36 * j: 36 * (j + 1)]
            x_img = x[cols]
            if variant == "spatial":
                grid = x_img.T.reshape(1, d, 6, 6)
                pj = F.interpolate(grid, size=(3, 3), mode="bilinear", align_corners=False).reshape(d, 9).T
                owner = torch.tensor([(r // 2) * 3 + c // 2 for r in range(6) for c in range(6)])
                spread = torch.zeros(36, 9).scatter(1, owner[:, None], 1.0)  # each token takes its proxy's
            else:
                init = adapter.initializer
                logits = init.queries @ (x_img @ init.key.weight.T).T / init.width ** 0.5  # [P, 36]
                pj = logits.softmax(-1) @ x_img
                spread = logits.T.softmax(-1)  # [36, P] splat weights
            proxies.append(pj)
            spreads.append(spread)
            positions.append(int(cols.min()) + torch.arange(pj.shape[0]))
            owner_of += [int(cols.min())] * pj.shape[0]
        proxies = torch.cat(proxies)
        n_p = proxies.shape[0]
        rows = torch.cat([x, proxies])
        positions = torch.cat([torch.arange(n_seq), *positions])
        kind = ["image" if i in image.tolist() else "text" for i in range(n_seq)] + ["proxy"] * n_p
        queries = list(range(n_seq, n_seq + n_p)) + text.tolist()
        allowed = torch.zeros(len(queries), n_seq + n_p, dtype=torch.bool)
        for qi, q in enumerate(queries):
            for k in range(n_seq + n_p):
                if kind[q] == "proxy":  # proxies see proxies (causally) and the text before their image
                    start = owner_of[q - n_seq]
                    ok = ((kind[k] == "proxy" and positions[k] <= positions[q])
                          or (kind[k] == "text" and k < start))
                else:  # text sees every sequence token up to itself, never a proxy
                    ok = kind[k] != "proxy" and positions[k] <= positions[q]
                allowed[qi, k] = ok

        attn = layer.self_attn
        normed = layer.input_layernorm(rows)
        text_config = model.config.text_config
        heads, kv_heads, hd = text_config.num_attention_heads, text_config.num_key_value_heads, attn.head_dim
        cos, sin = (t[0] for t in lm.rotary_emb(rows[None], positions[None]))

        def rope(t, at):
            half = torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)
            return t * cos[at, None] + half * sin[at, None]

        q_idx = torch.tensor(queries)
        q = rope(attn.q_proj(normed[q_idx]).view(-1, heads, hd), q_idx)
        k = rope(attn.k_proj(normed).view(-1, kv_heads, hd), torch.arange(n_seq + n_p))
        v = attn.v_proj(normed).view(-1, kv_heads, hd)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) * hd ** -0.5
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out = attn.o_proj(torch.einsum("hqk,khd->qhd", weights, v).reshape(len(queries), -1))
        h = rows[q_idx] + out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        new_proxies, new_text = h[:n_p], h[n_p:]
        expected = x.clone()
        expected[text] = new_text
        per_image = n_p // images
        for j in range(images):
            cols = image[36 * j: 36 * (j + 1)]
            own = new_proxies[per_image * j: per_image * (j + 1)]
            guidance = spreads[j] @ (own @ mlp.context_proj.weight.T)
            fused = F.silu(torch.cat([x[cols] @ mlp.input_proj.weight.T, guidance], -1) @ mlp.fuse.weight.T)
            y = fused @ mlp.out_proj.weight.T + x[cols]
            expected[cols] = mlp.norm.weight * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + mlp.norm.eps)
    assert torch.allclose(seen["y"], expected, atol=1e-5), (seen["y"] - expected).abs().max()
