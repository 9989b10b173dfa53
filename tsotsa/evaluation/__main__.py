"""`python -m tsotsa.evaluation run --model tsotsa --model_args coordinator=HOST:PORT[,adapter=RUN] --tasks T`:
lm-eval's own command line with the `tsotsa` model registered. lm-eval 0.4.13 finds models only in its
registry and has no plugin entry point for them, so this wrapper imports the backend (whose decorator
registers it) and then hands over to `lm_eval`'s CLI unchanged (also installed as `tsotsa-lm-eval`)."""

from __future__ import annotations


def main() -> None:
    import importlib

    from lm_eval.__main__ import cli_evaluate

    importlib.import_module("tsotsa.evaluation.backend")  # its decorator registers the "tsotsa" model
    cli_evaluate()


if __name__ == "__main__":
    main()
