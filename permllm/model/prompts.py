"""Fixed prompt sets for fidelity checks and demos, and the chat-template helper.

``FIDELITY_PROMPTS`` mixes topics and lengths. SmolLM2's chat template inserts a default system prompt
("You are a helpful AI assistant named SmolLM, trained by Hugging Face") when the conversation has none,
which costs 30 tokens of template overhead: a one-word prompt is 31 chat-templated tokens. The user
content itself spans from 1 token ("Hi") to ~170 tokens, so the templated lengths span 31 to ~200.
"""

from __future__ import annotations

from collections.abc import Mapping

DEMO_PROMPT = "What is the capital of France?"

FIDELITY_PROMPTS: list[str] = [
    # very short
    "Hi",
    "Capital of Japan?",
    "Thanks!",
    "Define entropy.",
    # short factual / geography / history / science
    DEMO_PROMPT,
    "Which river flows through Cairo?",
    "Who painted the Mona Lisa, and roughly when?",
    "Why is the sky blue? Answer in two sentences.",
    "In what year did the Berlin Wall fall, and why was it important?",
    "Explain photosynthesis to a ten-year-old.",
    "What is the difference between a virus and a bacterium?",
    # cooking / advice
    "How do I make a simple tomato sauce for pasta?",
    "Give me three tips for sleeping better at night.",
    "I have an interview tomorrow for a junior accountant position. How should I prepare tonight?",
    # coding
    "Write a Python function that returns the n-th Fibonacci number.",
    "What does the SQL keyword JOIN do? Show a short example with two tables.",
    "Fix this code: def add(a, b) return a + b",
    # math word problems
    "A train leaves at 3 pm and travels 120 km at 80 km/h. When does it arrive?",
    "Sarah has 3 times as many apples as Tom. Together they have 48 apples. How many apples does Tom have?",
    # poetry / creative
    "Write a haiku about autumn leaves.",
    "Write a short rhyming poem about a cat who wants to become a sailor and travel the seven seas.",
    # medium: translation / lists / comparison
    "Translate into French: 'The weather is nice today, let's go for a walk in the park.'",
    "List the planets of the solar system in order from the Sun, with one fact about each.",
    "Compare renewable and non-renewable energy sources. Mention costs, environmental impact and reliability.",
    # long: summarise / explain
    (
        "Summarise the following paragraph in one sentence: The Industrial Revolution began in Britain in the "
        "late eighteenth century and spread to Europe and North America over the following decades. It "
        "transformed economies that had been based on agriculture and handicrafts into economies dominated by "
        "industry and machine manufacturing. New technologies such as the steam engine, the spinning jenny and "
        "the power loom dramatically increased production, while railways and steamships made it cheaper and "
        "faster to move goods and people. These changes brought rising incomes for some, but also crowded "
        "cities, child labour and dangerous working conditions."
    ),
    (
        "Read this email and tell me what the sender wants: Hi team, as you know the quarterly report is due "
        "next Friday. Marco has finished the sales section, but we are still waiting on the numbers from the "
        "marketing department, which were supposed to arrive last Monday. Could somebody from marketing please "
        "send me the final campaign figures by Wednesday at the latest? If there are any problems with the data, "
        "let me know as soon as possible so that we can discuss how to present the results. Also, please remember "
        "that the meeting on Thursday has moved from room 4B to the large conference room on the ground floor. "
        "Thanks, Julia"
    ),
    (
        "I am planning a two-week trip to Italy in late September with my partner. We like history, good food "
        "and walking, but we do not want to rent a car and we prefer to stay at most four nights in each place. "
        "We will fly into Rome and out of Milan. Our budget is moderate: we are happy to pay for nice dinners "
        "but prefer simple hotels. Could you suggest an itinerary, explain how to travel between the cities by "
        "train, and mention one or two dishes we should try in each region? Please also tell us whether we need "
        "to book museum tickets such as the Vatican Museums or the Last Supper in advance, and how far ahead, and "
        "give a rough daily budget per person for food and transport."
    ),
    (
        "Here are my notes from a physics lecture; please turn them into five clear bullet points for revision. "
        "Notes: energy cannot be created or destroyed, only converted from one form to another, which is the "
        "first law of thermodynamics. Kinetic energy depends on mass and on the square of speed, so doubling the "
        "speed of a car quadruples its kinetic energy and makes braking distances much longer. Potential energy "
        "is stored because of position, for example water held behind a dam or a book on a high shelf. Power is "
        "the rate at which energy is transferred and is measured in watts, where one watt is one joule per "
        "second. Efficiency compares useful output energy with total input energy; no real machine is one "
        "hundred percent efficient because some energy is always lost as heat, sound or friction. The exam "
        "will include at least one calculation about a falling object."
    ),
]

MINILM_SENTENCES: list[str] = [
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Paris is the capital and most populous city of France.",
    "The stock market fell sharply after the interest rate announcement.",
    "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She played a beautiful sonata on the old piano last night.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Heavy rain is expected tomorrow across the northern regions, with possible flooding near rivers.",
    "I absolutely loved this movie!",
]


def _input_ids(result) -> list[int]:
    """apply_chat_template may return a list, a tensor, or (transformers 5) a BatchEncoding/dict."""
    if isinstance(result, Mapping) or hasattr(result, "input_ids"):
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    result = list(result)
    if result and isinstance(result[0], (list, tuple)):  # batched [[...]]
        if len(result) != 1:
            raise ValueError("expected a single conversation")
        result = list(result[0])
    return [int(t) for t in result]


def chat_token_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat (optional system message) ending with the assistant generation prompt."""
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    result = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors=None)
    return _input_ids(result)
