"""Built-in calibration samples: short, varied, written for this project (no downloaded data).

Chinese and English prose, dialogue, code, math and mixed text, in the three record formats
`calibration.py` reads. A real quantization run should use --calib with a few hundred samples
from the model's own domain; these are enough to calibrate and to test the pipeline.
"""
from __future__ import annotations


def _chat(*turns: str) -> dict:
    """A finetune-format conversation: user and assistant turns alternating, user first."""
    return {"conversations": [{"from": "user" if i % 2 == 0 else "assistant", "value": t} for i, t in enumerate(turns)]}


def _text(text: str) -> dict:
    return {"text": text}


DEFAULT_SAMPLES: list[dict] = [
    # ---- English dialogue
    _chat("What is the capital of Australia?",
          "The capital of Australia is Canberra. Many people guess Sydney or Melbourne, but Canberra was "
          "chosen in 1908 as a compromise between the two."),
    _chat("Can you give me three tips for sleeping better?",
          "1. Keep a regular schedule, even at weekends.\n2. Avoid screens for an hour before bed.\n"
          "3. Keep the bedroom cool, dark and quiet."),
    _chat("Summarize the plot of Romeo and Juliet in two sentences.",
          "Two young lovers from feuding families in Verona marry in secret. A chain of misunderstandings "
          "leads both of them to take their own lives, which finally reconciles their families."),
    _chat("I have eggs, spinach and cheese. What can I cook?",
          "A spinach and cheese omelette is quick: whisk three eggs, wilt the spinach in a pan, pour the eggs "
          "over it, sprinkle the cheese and fold once the bottom has set.",
          "How long does it take?",
          "About ten minutes from start to finish."),
    {"messages": [
        {"role": "system", "content": "You are a concise travel assistant."},
        {"role": "user", "content": "Is it worth visiting Kyoto in November?"},
        {"role": "assistant", "content": "Yes. November is autumn-leaf season, the weather is mild and the temples "
                                         "look their best, although popular spots are crowded at weekends."},
    ]},
    {"messages": [
        {"role": "user", "content": "Translate 'Where is the train station?' into French and German."},
        {"role": "assistant", "content": "French: « Où est la gare ? »\nGerman: „Wo ist der Bahnhof?“"},
    ]},
    _chat("Write a haiku about autumn rain.",
          "Cold rain on the roof,\nthe maple lets go its leaves,\none lamp in the dusk."),
    _chat("Explain what a neural network is to a ten-year-old.",
          "Imagine lots of tiny switches that pass notes to each other. Each switch learns, from many examples, "
          "how loudly to pass on what it hears, until together they can recognise a cat in a photo."),
    # ---- Chinese dialogue and prose
    _chat("你好，请介绍一下你自己。",
          "你好！我是一个人工智能助手，可以回答问题、写作、翻译和编程。有什么可以帮你的吗？"),
    _chat("北京有哪些值得一去的景点？",
          "北京值得一去的景点有：故宫、天坛、颐和园、八达岭长城和南锣鼓巷。建议春秋两季前往，天气比较舒适。"),
    _chat("请用一句话解释什么是光合作用。",
          "光合作用是绿色植物利用光能，把二氧化碳和水转化为有机物并释放氧气的过程。"),
    _chat("帮我写一封请假邮件，理由是家里有事。",
          "尊敬的王经理：\n您好！因家中有急事需要处理，我想于本周五请假一天。工作已安排同事跟进，"
          "如有紧急事项可随时电话联系我。\n谢谢您的理解！\n此致\n敬礼\n李明"),
    {"messages": [
        {"role": "user", "content": "《静夜思》的作者是谁？"},
        {"role": "assistant", "content": "《静夜思》的作者是唐代诗人李白。全诗为：床前明月光，疑是地上霜。举头望明月，低头思故乡。"},
    ]},
    _text("长江是中国最长的河流，全长约六千三百公里，发源于青藏高原，流经十一个省级行政区，最后注入东海。"
          "长江流域人口众多，经济发达，是中华文明的重要发源地之一。"),
    _text("人工智能的发展经历了几次起伏。近年来，随着算力的提升和数据的积累，深度学习在图像识别、"
          "语音识别和自然语言处理等领域取得了突破性进展。"),
    _chat("如何提高学习效率？",
          "可以试试这些方法：制定明确的计划；把大任务拆成小步骤；使用番茄工作法，每学习二十五分钟休息五分钟；"
          "定期复习，并尝试把学到的内容讲给别人听。"),
    _text("今天天气很好，我们一家人去公园散步。孩子们在草地上放风筝，老人在树荫下下棋，湖面上还有几条小船。"),
    # ---- code
    _chat("Write a Python function that checks whether a string is a palindrome.",
          "```python\ndef is_palindrome(s: str) -> bool:\n    cleaned = [c.lower() for c in s if c.isalnum()]\n"
          "    return cleaned == cleaned[::-1]\n\n\nprint(is_palindrome(\"A man, a plan, a canal: Panama\"))  # True\n```"),
    _text("import json\nfrom pathlib import Path\n\n\ndef load_config(path: Path) -> dict:\n"
          "    \"\"\"Read a JSON config file, with defaults for missing keys.\"\"\"\n"
          "    defaults = {\"batch_size\": 32, \"lr\": 3e-4, \"epochs\": 5}\n"
          "    data = json.loads(path.read_text(encoding=\"utf-8\"))\n    return {**defaults, **data}\n"),
    _text("SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS revenue\nFROM customers c\n"
          "JOIN orders o ON o.customer_id = c.id\nWHERE o.created_at >= '2023-01-01'\n"
          "GROUP BY c.name\nHAVING COUNT(o.id) > 5\nORDER BY revenue DESC\nLIMIT 10;"),
    _text("#include <stdio.h>\n\nint gcd(int a, int b) {\n    while (b != 0) {\n        int t = a % b;\n"
          "        a = b;\n        b = t;\n    }\n    return a;\n}\n\nint main(void) {\n"
          "    printf(\"%d\\n\", gcd(84, 36));\n    return 0;\n}\n"),
    _chat("用 JavaScript 写一个防抖函数。",
          "```javascript\nfunction debounce(fn, delay) {\n  let timer = null;\n  return function (...args) {\n"
          "    clearTimeout(timer);\n    timer = setTimeout(() => fn.apply(this, args), delay);\n  };\n}\n```\n"
          "在 delay 毫秒内重复调用时，只有最后一次会真正执行。"),
    _chat("What does this shell command do? `find . -name '*.log' -mtime +7 -delete`",
          "It searches the current directory tree for files ending in .log that were last modified more than "
          "seven days ago and deletes them."),
    _text("class Stack:\n    def __init__(self):\n        self._items = []\n\n    def push(self, item):\n"
          "        self._items.append(item)\n\n    def pop(self):\n        if not self._items:\n"
          "            raise IndexError(\"pop from empty stack\")\n        return self._items.pop()\n"),
    _text("fn main() {\n    let words = vec![\"apple\", \"banana\", \"cherry\"];\n"
          "    let lengths: Vec<usize> = words.iter().map(|w| w.len()).collect();\n"
          "    println!(\"{:?}\", lengths);\n}\n"),
    _chat("How do I undo the last git commit but keep the changes?",
          "Run `git reset --soft HEAD~1`. The commit is removed and its changes stay staged; use "
          "`git reset HEAD~1` instead to keep them unstaged."),
    # ---- math
    _chat("Solve 3x + 7 = 22.", "Subtract 7 from both sides: 3x = 15. Divide by 3: x = 5."),
    _chat("What is the derivative of x^3 * sin(x)?",
          "By the product rule: d/dx [x^3 sin x] = 3x^2 sin x + x^3 cos x."),
    _chat("一个长方形的长是8厘米，宽是5厘米，面积和周长分别是多少？",
          "面积 = 长 × 宽 = 8 × 5 = 40 平方厘米；周长 = 2 × (长 + 宽) = 2 × 13 = 26 厘米。"),
    _text("Theorem. There are infinitely many primes. Proof. Suppose p1, ..., pn were all of them and let "
          "N = p1 p2 ... pn + 1. No pi divides N, so N has a prime factor outside the list, a contradiction."),
    _chat("If a train travels 180 km in 2.5 hours, what is its average speed?",
          "Average speed = distance / time = 180 km / 2.5 h = 72 km/h."),
    _text("The quadratic formula gives the roots of ax^2 + bx + c = 0 as x = (-b ± sqrt(b^2 - 4ac)) / (2a). "
          "When the discriminant b^2 - 4ac is negative the roots are complex conjugates."),
    _chat("计算 1 + 2 + 3 + ... + 100。",
          "用高斯求和公式：n(n+1)/2 = 100 × 101 / 2 = 5050。"),
    _text("Let f(x) = e^(-x^2). Then the integral of f over the real line equals sqrt(pi), which follows from "
          "squaring the integral and switching to polar coordinates."),
    # ---- English prose
    _text("The Industrial Revolution began in Britain in the late eighteenth century. Steam engines, "
          "mechanised spinning and new iron-making methods moved production from homes to factories."),
    _text("Photosynthesis converts light energy into chemical energy. In the chloroplasts, water is split, "
          "oxygen is released and carbon dioxide is fixed into sugars through the Calvin cycle."),
    _text("Dear customer, thank you for your order #48213. Your package has shipped and should arrive within "
          "three to five business days. You can track it with the link below."),
    _text("In 1969 Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin spent about two and a half "
          "hours outside the lunar module while Michael Collins orbited above."),
    _text("Breaking news: heavy rain is expected across the region tonight. Drivers are advised to slow down, "
          "and residents near the river should follow the local authority's updates."),
    _text("Abstract: We study the effect of weight quantization on large language models and show that "
          "second-order error compensation keeps perplexity close to the full-precision baseline at 4 bits."),
    # ---- mixed and multi-turn
    _chat("What's the difference between a list and a tuple in Python?",
          "A list is mutable: you can append, remove or change items. A tuple is immutable, so it can be a "
          "dictionary key and signals that the data should not change.",
          "Which one is faster?",
          "Tuples are slightly faster to create and use a little less memory, but the difference rarely matters."),
    _chat("请把下面这句话翻译成英文：机器学习正在改变我们的生活。",
          "Machine learning is changing our lives."),
    _chat("Recommend a book for learning statistics.",
          "\"Statistics\" by Freedman, Pisani and Purves explains the ideas with almost no formulas; "
          "for a more mathematical treatment try \"All of Statistics\" by Larry Wasserman."),
    _text("Q: What is 15% of 240?\nA: 0.15 × 240 = 36.\nQ: And 240 increased by 15%?\nA: 240 + 36 = 276."),
    _chat("给我讲一个简短的笑话。",
          "老师问：“小明，你为什么上课迟到？”小明说：“因为路上有个牌子写着‘学校前方，慢行’。”"),
    _text("Meeting notes, 14 March: 1) the release moves to April 2; 2) Anna owns the migration script; "
          "3) open question: do we keep the v1 API for another quarter? Next meeting on Friday."),
    _text("温度：23℃，湿度：65%，风向：东南风2级。明天多云转晴，最高气温27℃，最低气温18℃，适宜户外活动。"),
    _chat("Convert 100 degrees Fahrenheit to Celsius.",
          "C = (F - 32) × 5/9 = (100 - 32) × 5/9 ≈ 37.8 °C."),
]
