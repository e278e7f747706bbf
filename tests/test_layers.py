"""The import graph (scripts/import_layers.py) points one way: no module imports one of a higher
layer, and no import cycle, over m2f_jax/ and convert/."""
import importlib.util
import os

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "import_layers.py")
_spec = importlib.util.spec_from_file_location("import_layers", _path)
layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layers)


def test_imports_point_down_the_layers_and_close_no_cycle():
    graph = layers.imports()
    assert {"m2f_jax.cli", "m2f_jax.hub", "m2f_jax.training.run", "convert.mapping"} <= set(graph)
    assert "m2f_jax.evaluation.run" in graph["m2f_jax.training.run"]  # function-level imports count
    assert layers.problems(graph) == []


def test_the_check_names_an_upward_import_and_a_cycle():
    graph = {"m2f_jax.hub": {"m2f_jax.training.run"}, "m2f_jax.training.run": {"m2f_jax.training.checkpoint"},
             "m2f_jax.training.checkpoint": {"m2f_jax.training.run"}}
    assert layers.problems(graph) == [
        "m2f_jax.hub (layer 1) imports m2f_jax.training.run (layer 3)",
        "cycle: m2f_jax.training.run -> m2f_jax.training.checkpoint -> m2f_jax.training.run",
    ]
