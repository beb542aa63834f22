"""Messages as chat templates take them (engine/prompt.py)."""

from lmcli.engine.prompt import plain_messages


def test_developer_is_system_and_names_reach_the_template_or_the_text():
    msgs = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": "Hi", "name": "ada"}]
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    assert plain_messages(msgs, chatml) == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "ada: Hi"}]
    with_names = "{% for m in messages %}{{ m.name or m.role }}: {{ m.content }}\n{% endfor %}"
    assert plain_messages(msgs, with_names)[1] == {"role": "user", "content": "Hi", "name": "ada"}
