import yaml

from gl10m import profile as prof
from gl10m.splits import border_drops


def scene(key, split, state, lon, lat, half=0.012):
    return {"key": key, "split": split, "state": state, "west": lon - half, "east": lon + half,
            "south": lat - half, "north": lat + half}


def test_scene_near_another_splits_state_leaves_the_smaller_split():
    p = prof.load()
    # CA (train) and AZ (test) boxes meet near -114.5; CO (train) is far from both tests here
    many_train = [scene(f"CA-w{i}", "train", "CA", -120 + i * 0.1, 36) for i in range(10)]
    az_border = scene("AZ-w1", "test", "AZ", -114.7, 34.0)     # inside CA's box + buffer
    az_inner = scene("AZ-w2", "test", "AZ", -111.9, 33.4)      # Phoenix: far from other splits
    ca_border = scene("CA-w99", "train", "CA", -114.3, 34.0)   # near AZ: train is bigger, kept
    drops = border_drops(many_train + [az_border, az_inner, ca_border], p)
    assert drops == {"AZ-w1": "border:CA"}


def test_ties_keep_the_held_out_split():
    p = prof.load()
    drops = border_drops([scene("AZ-w1", "test", "AZ", -114.7, 34.0),
                          scene("CA-w1", "train", "CA", -114.3, 34.0)], p)
    assert drops == {"CA-w1": "border:AZ"}


def test_same_split_neighbours_are_not_dropped(tmp_path):
    raw = yaml.safe_load(prof.DEFAULT_PROFILE.read_text())
    raw["splits"]["scheme"] = "reference"  # WA in train, CO val
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    p = prof.load(path)
    assert border_drops([scene("CO-w1", "val", "CO", -105, 39.7), scene("TX-w1", "train", "TX", -97, 32.7)], p) == {}
