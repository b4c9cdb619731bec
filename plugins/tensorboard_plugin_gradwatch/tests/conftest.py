"""Fixtures: synthetic gradwatch logs and a TensorBoard WSGI app serving them."""

import os

import pytest

from gradwatch import summaries, tags
from tensorboard_plugin_gradwatch import plugin, synthetic


@pytest.fixture(scope="session")
def logdir(tmp_path_factory):
    """A logdir with one synthetic gradwatch run (`train`) and one run without gradwatch data."""
    root = tmp_path_factory.mktemp("gwlogs")
    facts = synthetic.write_run(str(root / tags.TRAIN_RUN))
    plain = summaries.EventWriter(str(root / "plain"))
    plain.write_scalars(1, {"loss": 0.5})
    plain.close()
    return str(root), facts


@pytest.fixture(scope="session")
def empty_logdir(tmp_path_factory):
    """A logdir holding only ordinary scalars."""
    root = tmp_path_factory.mktemp("plainlogs")
    writer = summaries.EventWriter(str(root / "run"))
    for step in range(1, 30):
        writer.write_scalars(step, {"loss": 1.0 / step})
    writer.close()
    return str(root)


def make_app(logdir, extra_argv=()):
    """(WSGI app, flags) of a TensorBoard with only the gradwatch plugin, data loaded."""
    from tensorboard import program
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_ingester
    from tensorboard.plugins.core import core_plugin

    board = program.TensorBoard(
        plugins=[core_plugin.CorePluginLoader(), plugin.GradwatchPluginLoader])
    board.configure(["tensorboard", "--logdir", logdir, "--reload_interval", "0",
                     "--reload_task", "blocking", "--load_fast", "false", *extra_argv])
    ingester = data_ingester.LocalDataIngester(board.flags)
    ingester.start()
    app = application.TensorBoardWSGIApp(
        board.flags, board.plugin_loaders, ingester.data_provider,
        board.assets_zip_provider, ingester.deprecated_multiplexer)
    return app, board.flags


@pytest.fixture(scope="session")
def client(logdir):
    from werkzeug.test import Client

    app, _ = make_app(logdir[0])
    return Client(app)


def tensorboard_argv_env():
    """Environment for child TensorBoards: quiet TensorFlow, no GPU probing."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return env
