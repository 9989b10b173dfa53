"""The swarm as a model of EleutherAI's lm-eval (`backend.SwarmLM`, registered as `tsotsa`), the tasks
shipped with the project (`tasks/`), and `tsotsa eval run` (`run.py`). lm-eval is imported only here, and
only when an evaluation runs."""
