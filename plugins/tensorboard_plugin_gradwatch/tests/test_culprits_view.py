"""The alerts table's culprits (issue 25): ranked samples and previews, cleaned
of whatever a hand-made file holds."""

import base64

from tensorboard_plugin_gradwatch import records

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()


def test_culprits_are_read_with_their_previews():
    doc = {"step": 7, "culprits_summary": "sample 3 of the batch carries 90% of the gradient", "batch_size": 16,
           "culprits": [{"index": 3, "loss": 1e4, "grad_norm": "inf", "share": 0.9,
                         "preview": {"inputs": [{"name": "x", "kind": "image", "png": PNG},
                                                {"name": "x.b", "kind": "values", "shape": [2], "values": [1, "nan"]}],
                                     "target": [400.0]}}]}
    clean = records.explosion(doc)
    (culprit,) = clean["culprits"]
    assert culprit["index"] == 3 and culprit["grad_norm"] == "inf"
    assert culprit["preview"]["inputs"][0] == {"name": "x", "kind": "image", "png": PNG}
    assert culprit["preview"]["inputs"][1]["values"] == [1, "nan"]
    assert culprit["preview"]["target"] == [400.0]
    assert clean["culprits_summary"].startswith("sample 3")


def test_hostile_culprits_are_dropped_or_bounded():
    hostile = {"step": 1, "culprits_summary": "x" * 10_000, "culprits": [
        "not a dict", {"index": "3"}, {"index": True},
        {"index": 1, "loss": {"a": 1}, "preview": {"inputs": [
            {"name": "x", "kind": "image", "png": "javascript:alert(1)"},
            {"name": "x", "kind": "image", "png": "iVBORw0KGgo\" onerror=\"alert(1)"},
            {"name": "<script>", "kind": "html", "html": "<b>"},
            {"name": "v", "kind": "values", "values": list(range(1000)), "shape": ["a", 3]}]}},
    ] + [{"index": i} for i in range(100)]}
    clean = records.explosion(hostile)
    assert len(clean["culprits"]) <= records.MAX_CULPRITS_SHOWN  # the first ones looked at, the bad dropped
    first = clean["culprits"][0]
    assert first["index"] == 1 and first["loss"] is None
    inputs = first["preview"]["inputs"]
    assert [i["kind"] for i in inputs] == ["values"]  # no image from a non-PNG, no unknown kind
    assert len(inputs[0]["values"]) == 16 and inputs[0]["shape"] == [3]
    assert len(clean["culprits_summary"]) == 300
    assert records.explosion({"step": 2, "culprits": {"a": 1}})["culprits"] is None
