"""The workspace's shared test set-up: diffstack's pytest plugin (the tiny models, once per session)."""

pytest_plugins = ["diffstack.pytest_plugin"]
