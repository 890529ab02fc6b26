"""The command-line jobs: each module parses its arguments and calls ``pipelines/``; ``main(argv)``
is its entry point, installed as a console command (``allcore-train`` is ``jobs.train:main``,
see ``[project.scripts]`` in pyproject.toml).

Each job also runs as a file, ``python jobs/train.py ...``, which is how ``ray job submit
--working-dir . -- python jobs/train.py`` starts it in the unpacked copy of the checkout. Python
then puts ``jobs/`` on ``sys.path``, not the checkout, so every job starts with the one guarded
line ``if not __package__: sys.path.insert(0, <checkout>)``: run as a file, it imports the
packages of the checkout it lives in (the working-dir copy on a cluster), whatever is installed;
run as a command or with ``python -m jobs.train`` it changes nothing.
"""
