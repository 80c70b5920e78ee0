"""`so8t-hf chat` on a run's adapter/ folder: its base (named in adapter_config.json) loaded as SO8T-Phi3 through the
one loader, with the adapter merged in, answers as the run's complete model (final/) does."""

from so8t_hf.cli import main


def test_chat_on_the_adapter_folder_answers_as_the_final_model(hub_run, capsys):
    answers = []
    for folder in ("adapter", "final"):
        assert main(["chat", "--model", str(hub_run.out / folder), "--prompt", "What is 2+2?", "--show-thinking",
                     "--max-new-tokens", "12", "--dtype", "float32"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()
