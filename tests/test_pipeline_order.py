"""The flywheel reads its training data in an order that does not depend on how robots' uploads
interleaved in the store (a group commit takes them as they come), so one seed gives one run."""

from fleet.pipeline.services import in_robot_order
from fleet.store import EpisodeStore, StoreConfig
from sim.episode import Episode
from tests.conftest import make_episode_arrays


def test_episodes_are_read_robot_by_robot_in_each_robots_own_order(tmp_path):
    episodes = {
        r: [Episode.create(**make_episode_arrays(num_steps=5, seed=10 * i + k), robot_id=r, robot_model="toy", source="real") for k in range(3)]
        for i, r in enumerate(("robot-1", "robot-0", "robot-2"))
    }
    interleavings = (
        ["robot-0", "robot-1", "robot-2"] * 3,  # round robin
        ["robot-2"] * 3 + ["robot-1", "robot-0"] * 3,  # one robot first, then two alternating
    )
    orders = []
    for n, sequence in enumerate(interleavings):
        store = EpisodeStore.open_or_create(StoreConfig(path=str(tmp_path / f"store{n}")))
        sent = {r: 0 for r in episodes}
        for robot in sequence:  # one commit per upload, in this interleaving
            store.append([episodes[robot][sent[robot]]])
            sent[robot] += 1
        snapshot = store.snapshot()
        assert [i.robot_id for i in snapshot.episodes()] != sorted(sequence)  # the catalog follows the commits
        orders.append([i.episode_id for i in in_robot_order(snapshot.episodes())])
    assert orders[0] == orders[1] == [ep.episode_id for r in ("robot-0", "robot-1", "robot-2") for ep in episodes[r]]


def test_robots_are_in_their_numbers_order_past_ten():
    """Sorted as text, a fleet of 12 made robot-10 a canary before robot-2, and growing a fleet past ten changed each
    robot's seed (its rank)."""
    from fleet.pipeline.simfleet import robot_order

    ids = [f"robot-{i}" for i in range(12)]
    assert robot_order(reversed(ids)) == ids
    assert robot_order(ids[:8]) == sorted(ids[:8])  # ten or fewer: as before


def test_the_data_window_keeps_each_robots_newest_episodes_whatever_the_interleaving(tmp_path):
    """A fleet that ran for weeks read every episode ever stored each iteration (memory and time without end): the
    loop reads the newest ``loop.real_window_steps``, shared evenly between robots, the same cut however uploads met."""
    from fleet.pipeline.services import newest_within

    steps = {"robot-0": [5] * 6, "robot-1": [5] * 6, "robot-2": [5, 5]}  # robot-2 holds less than its share
    episodes = {
        r: [Episode.create(**make_episode_arrays(num_steps=n, seed=100 * i + k), robot_id=r, robot_model="toy", source="real") for k, n in enumerate(lengths)]
        for i, (r, lengths) in enumerate(steps.items())
    }
    kept = []
    for n, sequence in enumerate((["robot-0", "robot-1", "robot-2"] * 2 + ["robot-0", "robot-1"] * 4, ["robot-2"] * 2 + ["robot-1"] * 6 + ["robot-0"] * 6)):
        store = EpisodeStore.open_or_create(StoreConfig(path=str(tmp_path / f"store{n}")))
        sent = {r: 0 for r in episodes}
        for robot in sequence:
            store.append([episodes[robot][sent[robot]]])
            sent[robot] += 1
        infos = store.snapshot().episodes()
        assert [i.episode_id for i in newest_within(infos, None)] == [i.episode_id for i in in_robot_order(infos)]  # no window: all
        kept.append([i.episode_id for i in newest_within(infos, 50)])
    # 50 steps: robot-2 keeps its 10, the other two 20 each (their newest four, oldest first)
    expected = [ep.episode_id for r in ("robot-0", "robot-1") for ep in episodes[r][-4:]] + [ep.episode_id for ep in episodes["robot-2"]]
    assert kept[0] == kept[1] == expected



def test_the_data_window_passes_what_no_robot_can_use_of_its_share_to_long_episodes_that_fit(caplog):
    """A warehouse robot records one 500,000-step episode a shift: with a 1,000,000-step window over three robots its
    share (490,000) was under that episode, so it trained on nothing and the window stayed 2 % used. What no robot
    can use of its share goes to the next older episodes, the shortest first; an episode longer than the window is
    named."""
    import types

    from fleet.pipeline.services import newest_within

    def info(robot: str, n: int, k: int):
        return types.SimpleNamespace(robot_id=robot, num_steps=n, episode_id=f"{robot}/{k}")

    infos = [info("wh-02", 20_000, 0), info("wh-01", 300_000, 0), info("wh-01", 500_000, 1), info("wh-03", 2_000_000, 0), info("wh-04", 100, 0)]
    with caplog.at_level("WARNING", logger="fleet.pipeline.services"):
        kept = [i.episode_id for i in newest_within(infos, 700_000)]
    assert kept == ["wh-01/1", "wh-02/0", "wh-04/0"]  # 520,100 of 700,000 steps (was 20,100); wh-01's older 300,000 does not fit
    assert "the data window (700000 steps) holds no episode of robot(s) wh-03: the newest is 2,000,000 steps" in caplog.text
    assert "wh-01" not in caplog.text
    assert [i.episode_id for i in newest_within(infos, 1_000_000)] == ["wh-01/0", "wh-01/1", "wh-02/0", "wh-04/0"]  # 820,100


def test_what_is_left_of_the_window_goes_to_the_robot_holding_least_not_to_the_first_or_the_shortest():
    """A second reader's cases: a robot with 2,000 short episodes took all that the long-shift robots could not use of
    their shares (shortest next episode first), and 20 robots of 1,000-step episodes in a 10,000-step window left it
    all to robot-00 (ties by id). What is left goes to the robot holding the fewest steps so far."""
    import types

    from fleet.pipeline.services import newest_within

    def fleet(spec: dict[str, list[int]]) -> list:
        return [types.SimpleNamespace(robot_id=r, num_steps=n, episode_id=f"{r}/{k}") for r, lengths in spec.items() for k, n in enumerate(lengths)]

    def held(kept: list) -> dict[str, int]:
        out: dict[str, int] = {}
        for info in kept:
            out[info.robot_id] = out.get(info.robot_id, 0) + info.num_steps
        return out

    assert held(newest_within(fleet({"arm": [1_000] * 2_000, "shift-a": [600_000], "shift-b": [500_000]}), 1_000_000)) == {"arm": 500_000, "shift-b": 500_000}
    assert held(newest_within(fleet({f"robot-{k:02d}": [1_000] * 50 for k in range(20)}), 10_000)) == {f"robot-{k:02d}": 1_000 for k in range(10)}
    assert held(newest_within(fleet({f"robot-{k:02d}": [1_000] * 50 for k in range(4)}), 10_000)) == {f"robot-{k:02d}": 3_000 if k < 2 else 2_000 for k in range(4)}
