"""An SGLang program for `jobs/program.yaml`: each row's `question` column is the argument."""

import sglbatch as sgl


@sgl.function
def answer_and_rate(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=48, stop="\n"))
    s += sgl.user("Is that answer correct? Answer yes or no.")
    s += sgl.assistant(sgl.select("verdict", choices=["yes", "no"]))
