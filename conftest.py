"""The workspace's shared test set-up: diffstack's pytest plugin (the tiny models, once per session),
and pytest's own ``pytester`` for the tests of that plugin."""

pytest_plugins = ["diffstack.pytest_plugin", "pytester"]
