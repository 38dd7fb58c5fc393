"""The ``dagan`` command and its offline commands: the application layer over the library.

``commands.cli`` is the console script's entry point (``dagan = "commands.cli:main"``); it collects the
sub-commands of this package (``animate``, ``demo``, ``init-checkpoint``, ``bench``, ``import``,
``synth``, ``export``) and of the other applications (``server``, ``vcam``, ``training``,
``evaluation``). Nothing in the library (``dagan``, ``export``, ``engine``) imports this package; see
README.md's layering and tests/test_layers.py.
"""
