"""Make states/demo-prefilled.pth: a state file for the bundled demo model, written by prefilling
a few example turns. It gives the state-file pane something that fits the demo model and shifts
its replies; the 3-layer demo is too small to pick up facts (like a name) this way. Real tuned
states come from RWKV-PEFT state tuning.

    python scripts/make_demo_state.py
"""
from pathlib import Path

from rwkv_chat import Pipeline, RWKV
from rwkv_chat.chat import save_state_file
from rwkv_chat.chat.template import exchange
from rwkv_chat.demo import demo_model_path

EXAMPLES = [
    ("What is your name?", "My name is Goose. I am a tiny demo model."),
    ("Hi Goose!", "Hi! Goose here. How are you?"),
    ("Who are you?", "I am Goose, a very small RWKV model. I like to chat."),
    ("Goose, what do you like?", "I like to talk about music, games and food."),
]


def main() -> None:
    pipe = Pipeline(RWKV(demo_model_path()))
    text = "".join(exchange(q, a) for q, a in EXAMPLES)
    state = pipe.prefill(text)
    out = Path(__file__).resolve().parents[1] / "states" / "demo-prefilled.pth"
    save_state_file(state, out)
    print(f"wrote {out} ({state.tokens} tokens prefilled)")


if __name__ == "__main__":
    main()
