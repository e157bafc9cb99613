"""--head-init label-names: the intent head starts as the cosine classifier of the label names'
embeddings (nlu/head_init.py), built from the public label schema only."""

import json

import pytest
import torch

from nlu.head_init import TAU, init_head_from_texts, label_name_text, label_texts, labels_are_text
from nlu.model import build_model, load_tokenizer
from partitions.population import build_population
from server.plan import resolve, resolve_head_init
from settings.config import ConfigError, RunConfig
from tests.inprocess import toy_config, write_lamp_data

pytestmark = pytest.mark.usefixtures("task_identity")


def test_label_names_read_as_words():
    assert label_name_text("card_arrival") == "card arrival"
    assert label_name_text("AddToPlaylist") == "add to playlist"
    assert label_name_text("get-weather.now") == "get weather now"
    assert labels_are_text(["card_arrival", "AddToPlaylist", "on"])
    assert not labels_are_text(["0", "1", "2"]) and not labels_are_text(["a", "b"]) and not labels_are_text([])


def test_the_head_is_the_cosine_classifier_of_the_label_texts():
    texts = ["turn the lamp on", "switch the heater off", "what is the weather", "play some music"]
    model = build_model("tiny", len(texts), seed=0).train()
    tok = load_tokenizer("tiny")
    emb = init_head_from_texts(model, texts, tok, max_length=16)
    assert model.training  # its mode is restored
    w = model.classifier.weight.detach()
    norms = emb.norm(dim=1)
    assert torch.allclose(w, TAU * emb / norms[:, None] / norms.mean(), atol=1e-6)
    assert torch.all(model.classifier.bias == 0)
    # each label's own text is scored highest by its own row (cosine 1 with itself)
    model.eval()
    batch = tok(texts, padding=True, return_tensors="pt", max_length=16, truncation=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.argmax(1).tolist() == list(range(len(texts)))
    with pytest.raises(ValueError, match="4 labels"):
        init_head_from_texts(model, texts[:3], tok)


def test_the_initial_head_reads_nothing_but_the_label_names(tmp_path):
    """Two data sets with the same labels and different utterances start from the same head."""
    from server.state import Server

    heads = []
    for name, words in (("a", "zorblax lamp"), ("b", "completely different words about a lamp")):
        d = tmp_path / name
        d.mkdir()
        with open(d / "train.jsonl", "w") as fh:
            for i in range(12):
                fh.write(json.dumps({"text": f"{words} {i} on", "label": "lamp_on"}) + "\n")
                fh.write(json.dumps({"text": f"{words} {i} off", "label": "lamp_off"}) + "\n")
        with open(d / "test.jsonl", "w") as fh:
            fh.write(json.dumps({"text": "on", "label": "lamp_on"}) + "\n")
            fh.write(json.dumps({"text": "off", "label": "lamp_off"}) + "\n")
        (d / "labels.json").write_text(json.dumps(["lamp_on", "lamp_off"]))  # the declared (public) schema
        cfg = toy_config(tmp_path / f"run-{name}", d, rounds=1)
        server = Server(cfg)
        assert server.cfg.head_init == "label-names"  # auto, resolved and recorded
        heads.append(server.model.classifier.weight.detach().clone())
        server.ledger.close()
    assert torch.equal(heads[0], heads[1])
    random_head = build_model("tiny", 2, seed=0).classifier.weight.detach()
    assert not torch.allclose(heads[0], random_head)


def test_auto_resolves_by_task_pooling_and_labels(tmp_path):
    data = write_lamp_data(tmp_path)  # labels "on" / "off": words, but read off train.jsonl (no labels.json)
    cfg = toy_config(tmp_path / "run", data)
    assert resolve(cfg, build_population(cfg)).settings.head_init == "random"  # names from the data: not public
    with pytest.raises(ConfigError, match="labels.json"):
        resolve(cfg.replace(head_init="label-names"), build_population(cfg))
    (data / "labels.json").write_text(json.dumps(["off", "on"]))  # the declared schema
    from partitions.population import population_for_key

    population_for_key.cache_clear()
    assert resolve(cfg, build_population(cfg)).settings.head_init == "label-names"
    assert resolve_head_init(cfg, ["0", "1"]) == "random"
    assert resolve_head_init(cfg.replace(pooling="cls"), ["on", "off"]) == "random"
    assert resolve_head_init(cfg.replace(task="joint"), ["on", "off"]) == "random"
    assert resolve_head_init(cfg.replace(head_init="random"), ["on", "off"]) == "random"
    with pytest.raises(ConfigError, match="--head-init"):
        RunConfig(head_init="label-names", pooling="cls").validate()


def test_label_descriptions_replace_the_names_and_bad_files_name_themselves(tmp_path):
    good = tmp_path / "desc.json"
    good.write_text(json.dumps({"on": "the user wants a light switched on", "off": "switch it off"}))
    assert label_texts(["on", "off"], good) == ["the user wants a light switched on", "switch it off"]
    assert label_texts(["card_arrival"]) == ["card arrival"]
    cfg = RunConfig(label_descriptions=str(tmp_path / "short.json"))  # a descriptions file declares the schema
    (tmp_path / "short.json").write_text(json.dumps({"on": "light on"}))
    with pytest.raises(ConfigError, match=r"short\.json: no description for 1 label\(s\), e\.g\. off"):
        resolve_head_init(cfg, ["on", "off"], declared=False)
    (tmp_path / "short.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"short\.json: cannot read"):
        resolve_head_init(cfg, ["on", "off"])
    (tmp_path / "short.json").write_text(json.dumps({"on": 3, "off": "x"}))
    with pytest.raises(ConfigError, match="JSON object"):
        resolve_head_init(cfg, ["on", "off"])


def test_a_run_resolved_to_random_drops_the_descriptions_and_resumes(tmp_path):
    """--label-descriptions with a task the prior does not apply to: the head is random, the file is not
    recorded, and the recorded settings validate again (a resume)."""
    from rundir import config_path

    data = write_lamp_data(tmp_path)
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({"on": "light on", "off": "light off"}))
    cfg = toy_config(tmp_path / "run", data, label_descriptions=str(desc), pooling="cls")
    plan = resolve(cfg, build_population(cfg))
    assert plan.settings.head_init == "random" and plan.settings.label_descriptions is None
    plan.settings.validate()


def test_a_config_from_before_head_init_resumes_as_it_started(tmp_path):
    """A config.toml without head_init predates it: random head, and --no-dp was FedAvg of local training."""
    import tomli_w

    old = tmp_path / "config.toml"
    old.write_text(tomli_w.dumps({"dp": False, "noise_at": "aggregate", "rounds": 3}))
    cfg = RunConfig.from_toml(old)
    assert cfg.head_init == "random" and cfg.noise_at == "device"
    old.write_text(tomli_w.dumps({"dp": True, "noise_at": "aggregate", "rounds": 3}))
    assert RunConfig.from_toml(old).noise_at == "aggregate"
    new = tmp_path / "new.toml"
    new.write_text(tomli_w.dumps({"dp": False, "noise_at": "aggregate", "head_init": "label-names"}))
    assert RunConfig.from_toml(new).noise_at == "aggregate" and RunConfig.from_toml(new).head_init == "label-names"


def test_the_server_step_is_smaller_for_fedadam_on_the_label_name_head():
    assert RunConfig(head_init="label-names").resolved_server_learning_rate() == 0.1  # FedAdam (aggregate)
    assert RunConfig(head_init="random").resolved_server_learning_rate() == 0.2
    assert RunConfig(head_init="label-names", strategy="fedavg").resolved_server_learning_rate() == 0.2
    assert RunConfig(head_init="label-names", server_learning_rate=0.3).resolved_server_learning_rate() == 0.3
