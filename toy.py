"""The toy world: AI-STA end to end on a laptop CPU, from a seed.

A small synthetic speech-translation world, generated here and cached, with tiny *pretrained* base models
saved in the exact public checkpoint layouts, so the real code paths (loaders, training, layer selection,
evaluation) run unchanged on it:

  1. two languages: a fragment of English (3-12 words: agreement, case, modifiers, relative clauses,
     subordinate clauses) and its translation into Chinese characters, produced from one syntax tree by two
     linearisations. Not a word-for-word cipher: adverbials and reason/time clauses move before the verb,
     relative clauses before the noun; `the`, `that`, `does` have no counterpart; `a` -> 一 + a classifier
     chosen by the noun; `in the X` -> 在 X 里; `is running` -> 正在跑; `old` -> 老 or 旧 by the noun;
  2. speech: each English sentence rendered at 16 kHz by a source-filter synthesizer written here: every
     letter is a phone-like segment (vowels and sonorants are formants over a pitch contour, fricatives
     band noise, stops a closure and a burst), with each utterance's own speaker (pitch, vocal-tract
     length), speaking rate, jitter and background noise, so no word sounds the same twice;
  3. sounds for captioning: tones, chirps, noise bursts, clicks and buzzes in sequences, with templated
     captions ("a rising chirp, then two clicks");
  4. manifests in the project's JSON-lines format: stage-1 ASR and captioning, a LibriSpeech-test-clean-like
     ASR set for layer selection, and a small speech-translation set; plenty of text for the LLM;
  5. base models pretrained by the build: a Qwen2-architecture LLM (byte-level BPE tokenizer, sharded
     safetensors) on the text, on MT pairs and on repeating English in the chat template; a
     Whisper-architecture encoder on the speech (CTC on letters, and the LLM token at each frame); a
     BEATs-architecture encoder on the sounds (and the LLM token under each patch of speech).

    python toy.py build --out toy_world --seed 0 [--quick]

Everything is deterministic from the seed: the text, audio and manifests byte for byte (numpy only, no
torch), the weights for a given machine and thread count.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------------
# 1. The two languages
# ----------------------------------------------------------------------------------------------------
#
# A sentence is built as a tree of phrases; each phrase carries its English words and its Chinese string,
# so the two languages are two linearisations of one structure. The rules of the Chinese side, in the order
# the code applies them:
#   NP   = [det+classifier | 这些 | 我的 ...] [relative clause + 的] [adjective (+ 的 if two characters or
#          modified by 很/非常)] noun         "the big dog that sees the cat" -> 看见猫的大狗
#   VP   = subject [time] [place PP] [manner] aspect/negation verb [了] [object]
#          "the dog ate the apple in the house yesterday" -> 狗昨天在房子里吃了苹果
#   pred = subject 很/非常/不 adjective   ("is" has no counterpart, 很 has none in English)
#   S because S  /  S when S  -> 因为 S ， 所以 S 。 / S 的时候 ， S 。  (the subordinate clause always first)

# nouns: singular, plural, Chinese, classifier, kind (animal / person / thing / place)
NOUNS = [
    ("dog", "dogs", "狗", "只", "animal"), ("cat", "cats", "猫", "只", "animal"),
    ("bird", "birds", "鸟", "只", "animal"), ("horse", "horses", "马", "匹", "animal"),
    ("fish", "fish", "鱼", "条", "animal"), ("mouse", "mice", "老鼠", "只", "animal"),
    ("rabbit", "rabbits", "兔子", "只", "animal"), ("cow", "cows", "牛", "头", "animal"),
    ("man", "men", "男人", "个", "person"), ("woman", "women", "女人", "个", "person"),
    ("child", "children", "孩子", "个", "person"), ("teacher", "teachers", "老师", "位", "person"),
    ("doctor", "doctors", "医生", "位", "person"), ("farmer", "farmers", "农民", "个", "person"),
    ("student", "students", "学生", "个", "person"), ("king", "kings", "国王", "位", "person"),
    ("book", "books", "书", "本", "thing"), ("apple", "apples", "苹果", "个", "thing"),
    ("car", "cars", "车", "辆", "thing"), ("letter", "letters", "信", "封", "thing"),
    ("cup", "cups", "杯子", "个", "thing"), ("boat", "boats", "船", "条", "thing"),
    ("ball", "balls", "球", "个", "thing"), ("cake", "cakes", "蛋糕", "块", "thing"),
]
FOOD = {"apple", "cake", "fish"}
WRITTEN = {"book", "letter"}

# places for prepositional phrases: English, Chinese, the prepositions that fit
PLACES = [
    ("house", "房子", ("in", "near", "behind")), ("garden", "花园", ("in", "near")),
    ("river", "河", ("near",)), ("school", "学校", ("in", "near", "behind")),
    ("park", "公园", ("in", "near")), ("kitchen", "厨房", ("in",)), ("forest", "森林", ("in", "near")),
    ("table", "桌子", ("under", "near", "on")), ("tree", "树", ("under", "behind", "near")),
    ("bridge", "桥", ("under", "on", "near")),
]
# a preposition is a circumposition around the place: in the house -> 在房子里
PREPOSITIONS = {"in": ("在", "里"), "near": ("在", "附近"), "behind": ("在", "后面"),
                "under": ("在", "下面"), "on": ("在", "上")}

# verbs: base, 3rd singular, past, -ing, Chinese; a particle follows the English verb (look at, pick up)
INTRANSITIVE = [
    ("run", "runs", "ran", "running", "跑"), ("sleep", "sleeps", "slept", "sleeping", "睡觉"),
    ("sing", "sings", "sang", "singing", "唱歌"), ("swim", "swims", "swam", "swimming", "游泳"),
    ("dance", "dances", "danced", "dancing", "跳舞"), ("cry", "cries", "cried", "crying", "哭"),
    ("laugh", "laughs", "laughed", "laughing", "笑"), ("walk", "walks", "walked", "walking", "走路"),
    ("wait", "waits", "waited", "waiting", "等"), ("jump", "jumps", "jumped", "jumping", "跳"),
    ("wake up", "wakes up", "woke up", "waking up", "醒来"), ("sit down", "sits down", "sat down", "sitting down", "坐下"),
]
# transitive verbs and the kinds of object they take ("food", "written", "thing", "animate", "any")
TRANSITIVE = [
    ("see", "sees", "saw", "seeing", "看见", "any"), ("eat", "eats", "ate", "eating", "吃", "food"),
    ("read", "reads", "read", "reading", "读", "written"), ("write", "writes", "wrote", "writing", "写", "written"),
    ("buy", "buys", "bought", "buying", "买", "thing"), ("find", "finds", "found", "finding", "找到", "any"),
    ("like", "likes", "liked", "liking", "喜欢", "any"), ("carry", "carries", "carried", "carrying", "带着", "thing"),
    ("help", "helps", "helped", "helping", "帮助", "animate"), ("push", "pushes", "pushed", "pushing", "推", "thing"),
    ("look at", "looks at", "looked at", "looking at", "看", "any"),
    ("pick up", "picks up", "picked up", "picking up", "捡起", "thing"),
    ("look for", "looks for", "looked for", "looking for", "找", "any"),
]
# adjectives: English, Chinese for animate nouns, Chinese for things (old -> 老 / 旧)
ADJECTIVES = [
    ("big", "大", "大"), ("large", "大", "大"), ("small", "小", "小"), ("little", "小", "小"),
    ("red", "红", "红"), ("white", "白", "白"), ("black", "黑", "黑"), ("old", "老", "旧"),
    ("young", "年轻", None), ("happy", "快乐", None), ("beautiful", "漂亮", "漂亮"), ("new", None, "新"),
]
# predicative adjectives (subject is ...): only for animate subjects
PREDICATES = [("hungry", "饿"), ("tired", "累"), ("happy", "高兴"), ("sad", "难过"), ("busy", "忙"),
              ("big", "大"), ("small", "小"), ("old", "老"), ("young", "年轻")]
MANNER = [("quickly", "很快地"), ("slowly", "慢慢地"), ("quietly", "安静地"), ("happily", "高兴地")]
# time adverbs and the tenses they fit
TIMES = [("yesterday", "昨天", ("past",)), ("today", "今天", ("past", "progressive", "future")),
         ("tomorrow", "明天", ("future",)), ("every day", "每天", ("present",)), ("now", "现在", ("progressive",))]
PRONOUNS = [  # subject, object, Chinese, person, number
    ("i", "me", "我", 1, "sg"), ("you", "you", "你", 2, "sg"), ("he", "him", "他", 3, "sg"),
    ("she", "her", "她", 3, "sg"), ("we", "us", "我们", 1, "pl"), ("they", "them", "他们", 3, "pl"),
]
POSSESSIVES = [("my", "我的"), ("your", "你的"), ("his", "他的"), ("her", "她的"), ("our", "我们的"), ("their", "他们的")]
NUMBERS = [("two", "两"), ("three", "三"), ("four", "四")]
SAY_VERBS = [("say", "says", "said", "说"), ("think", "thinks", "thought", "觉得"), ("know", "knows", "knew", "知道")]
VOWELS = set("aeiou")


@dataclass
class Phrase:
    en: list[str]
    zh: str
    person: int = 3
    number: str = "sg"
    kind: str = "thing"


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _adjective(rng, kind: str) -> tuple[str, str] | None:
    """An adjective fitting a noun of `kind`: (English, Chinese)."""
    animate = kind in ("animal", "person")
    options = [(en, a if animate else t) for en, a, t in ADJECTIVES if (a if animate else t)]
    return _pick(rng, options)


def noun_phrase(rng, role: str, kind: str = "any", depth: int = 0) -> Phrase:
    """A noun phrase as subject or object; `kind` restricts the noun (see TRANSITIVE)."""
    if kind in ("any", "animate") and rng.random() < 0.18:
        subj, obj, zh, person, number = _pick(rng, PRONOUNS)
        return Phrase([subj if role == "subject" else obj], zh, person, number, "person")
    nouns = [n for n in NOUNS if kind == "any" or n[4] == kind or (kind == "animate" and n[4] in ("animal", "person"))
             or (kind == "food" and n[0] in FOOD) or (kind == "written" and n[0] in WRITTEN)]
    sg, pl, zh_noun, cl, nkind = _pick(rng, nouns)
    plural = rng.random() < 0.3
    en_noun = pl if plural else sg
    # the determiner: English article/demonstrative/number; Chinese (number or demonstrative) + classifier
    r = rng.random()
    if plural:
        det = (("the", "") if r < 0.45 else _pick(rng, [("these", "这些"), ("those", "那些")]) if r < 0.6
               else (lambda n: (n[0], n[1] + cl))(_pick(rng, NUMBERS)) if r < 0.75
               else _pick(rng, [("some", "一些"), ("many", "很多")]) if r < 0.85 else _pick(rng, POSSESSIVES))
    else:
        det = (("the", "") if r < 0.5 else ("a", "一" + cl) if r < 0.7
               else _pick(rng, [("this", "这" + cl), ("that", "那" + cl)]) if r < 0.85 else _pick(rng, POSSESSIVES))
    adj_en, adj_zh = [], ""
    if rng.random() < 0.3:
        en, zh = _adjective(rng, nkind)
        if rng.random() < 0.2:
            very = _pick(rng, [("very", "很"), ("very", "非常")])  # very -> 很 or 非常 (free variation, as in Chinese)
            adj_en, adj_zh = ["very", en], very[1] + zh + "的"
        else:
            adj_en, adj_zh = [en], zh + ("的" if len(zh) > 1 else "")
    rel_en, rel_zh = [], ""
    if depth == 0 and rng.random() < 0.12:
        rel_en, rel_zh = relative_clause(rng, plural)
    det_en, det_zh = det
    if det_en == "a" and (adj_en or [en_noun])[0][0] in VOWELS:
        det_en = "an"
    return Phrase([*det_en.split(), *adj_en, *en_noun.split(), *rel_en], det_zh + rel_zh + adj_zh + zh_noun,
                  3, "pl" if plural else "sg", nkind)


def relative_clause(rng, plural: bool) -> tuple[list[str], str]:
    """'that sees the cat' -> 看见猫的 (before the noun in Chinese); present or past, positive."""
    past = rng.random() < 0.4
    if rng.random() < 0.5:
        base, s3, pa, _, zh = _pick(rng, INTRANSITIVE)
        en = pa if past else (base if plural else s3)
        return ["that", *en.split()], zh + "的"
    base, s3, pa, _, zh, okind = _pick(rng, TRANSITIVE)
    obj = noun_phrase(rng, "object", okind, depth=1)
    en = pa if past else (base if plural else s3)
    return ["that", *en.split(), *obj.en], zh + obj.zh + "的"


def verb_forms(subject: Phrase, verb: tuple, tense: str, negative: bool) -> tuple[list[str], str, str]:
    """English verb group with agreement, and the Chinese (pre-verb, verb + aspect) parts.

    Returns (english words, chinese before the verb, chinese verb with aspect marker): 了 follows a past
    positive verb, 没有 negates the past, 不 the present and future, 正在 marks the progressive.
    """
    base, s3, past, ing, zh = verb[:5]
    third_sg = subject.person == 3 and subject.number == "sg"
    be = ("am" if subject.person == 1 and subject.number == "sg" else "is" if third_sg else "are")
    if tense == "present":
        en = (["does" if third_sg else "do", "not", *base.split()] if negative
              else (s3 if third_sg else base).split())
        return en, "不" if negative else "", zh
    if tense == "past":
        en = ["did", "not", *base.split()] if negative else past.split()
        return en, "没有" if negative else "", zh if negative else zh + "了"
    if tense == "progressive":
        en = [be, *(["not"] if negative else []), *ing.split()]
        return en, "没有在" if negative else "正在", zh
    en = ["will", *(["not"] if negative else []), *base.split()]           # future
    return en, "不会" if negative else "会", zh


def simple_clause(rng) -> Phrase:
    """One clause: an action (intransitive or transitive, with optional place, manner, time) or a
    predicate (is hungry, is in the house)."""
    r = rng.random()
    if r < 0.16:                                                            # predicative
        subj = noun_phrase(rng, "subject", "animate")
        third_sg = subj.person == 3 and subj.number == "sg"
        be = "am" if subj.person == 1 and subj.number == "sg" else "is" if third_sg else "are"
        neg = rng.random() < 0.2
        if rng.random() < 0.6:
            en, zh = _pick(rng, PREDICATES)
            degree = ("not", "不") if neg else (("very", "非常") if rng.random() < 0.3 else ("", "很"))
            return Phrase([*subj.en, be, *degree[0].split(), en], subj.zh + degree[1] + zh)
        place, pp = place_phrase(rng)
        return Phrase([*subj.en, be, *(["not"] if neg else []), *place], subj.zh + ("不" if neg else "") + pp)
    subj = noun_phrase(rng, "subject", "animate")
    tense = _pick(rng, ["present", "past", "progressive", "future"])
    negative = rng.random() < 0.15
    transitive = r < 0.62
    verb = _pick(rng, TRANSITIVE if transitive else INTRANSITIVE)
    en_verb, zh_pre, zh_verb = verb_forms(subj, verb, tense, negative)
    obj = noun_phrase(rng, "object", verb[5]) if transitive else None
    place = place_phrase(rng) if rng.random() < 0.25 else None
    manner = _pick(rng, MANNER) if (not transitive and rng.random() < 0.2) else None
    times = [t for t in TIMES if tense in t[2]]
    when = _pick(rng, times) if (times and rng.random() < 0.25) else None
    en = [*subj.en, *en_verb, *(obj.en if obj else []), *(place[0] if place else []),
          *(manner[0].split() if manner else []), *(when[0].split() if when else [])]
    zh = (subj.zh + (when[1] if when else "") + (place[1] if place else "") + (manner[1] if manner else "")
          + zh_pre + zh_verb + (obj.zh if obj else ""))
    return Phrase(en, zh)


def place_phrase(rng) -> tuple[list[str], str]:
    en, zh, preps = _pick(rng, PLACES)
    prep = _pick(rng, preps)
    before, after = PREPOSITIONS[prep]
    return [prep, "the", en], before + zh + after


def sentence(rng) -> tuple[str, str]:
    """One (English, Chinese) pair. English: lower case, no punctuation (an ASR transcript); Chinese:
    clauses separated by ， and ended by 。."""
    r = rng.random()
    if r < 0.1:                                                             # because
        a, b = simple_clause(rng), simple_clause(rng)
        if rng.random() < 0.5:
            return " ".join(["because", *a.en, *b.en]), f"因为{a.zh}，所以{b.zh}。"
        return " ".join([*b.en, "because", *a.en]), f"因为{a.zh}，所以{b.zh}。"
    if r < 0.18:                                                            # when
        a, b = simple_clause(rng), simple_clause(rng)
        if rng.random() < 0.5:
            return " ".join(["when", *a.en, *b.en]), f"{a.zh}的时候，{b.zh}。"
        return " ".join([*b.en, "when", *a.en]), f"{a.zh}的时候，{b.zh}。"
    if r < 0.26:                                                            # says that
        subj = noun_phrase(rng, "subject", "person")
        base, s3, past, zh = _pick(rng, SAY_VERBS)
        third_sg = subj.person == 3 and subj.number == "sg"
        verb = past if rng.random() < 0.4 else (s3 if third_sg else base)
        a = simple_clause(rng)
        return " ".join([*subj.en, verb, "that", *a.en]), f"{subj.zh}{zh}{a.zh}。"
    a = simple_clause(rng)
    return " ".join(a.en), a.zh + "。"


# Free variation: translators choose among synonyms, so one English sentence has several right translations and
# a reference is one of them (CoVoST 2 has one reference per sentence too). Every Chinese sentence of the world
# takes, at each of these words, the alternative with probability ZH_VARIATION, drawn from a stream of its
# own (the English sentences, and so the speech, do not depend on it). This sets the toy's BLEU ceiling below
# 100: a model that always writes the first form scores about 58 against 78 for the same hypotheses on
# references without variation (seed 2's base model, REPRODUCTION.md). Words listed with themselves only
# never vary (不会 is not 不将; 跳舞 is not 跳 + 舞).
ZH_VARIANTS = {
    "鸟": ("鸟", "小鸟"), "男人": ("男人", "男子"), "女人": ("女人", "女子"), "孩子": ("孩子", "小孩"),
    "老师": ("老师", "教师"), "医生": ("医生", "大夫"), "农民": ("农民", "农夫"), "车": ("车", "汽车"),
    "杯子": ("杯子", "茶杯"), "房子": ("房子", "屋子"), "里": ("里", "里面"), "上": ("上", "上面"),
    "附近": ("附近", "旁边"), "跑": ("跑", "奔跑"), "哭": ("哭", "哭泣"), "笑": ("笑", "大笑"), "等": ("等", "等待"),
    "走路": ("走路", "散步"), "醒来": ("醒来", "醒了"), "跳舞": ("跳舞",), "看见": ("看见", "看到"),
    "读": ("读", "阅读"), "买": ("买", "购买"), "找到": ("找到", "发现"), "找": ("找", "寻找"), "喜欢": ("喜欢", "爱"),
    "帮助": ("帮助", "帮"), "带着": ("带着", "拿着"), "说": ("说", "讲"), "觉得": ("觉得", "认为"),
    "快乐": ("快乐", "开心"), "高兴": ("高兴", "开心"), "难过": ("难过", "伤心"), "漂亮": ("漂亮", "美丽"),
    "非常": ("非常", "十分"), "很多": ("很多", "许多"), "一些": ("一些", "有些"), "慢慢地": ("慢慢地", "缓慢地"),
    "很快地": ("很快地", "迅速地"), "今天": ("今天", "今日"), "明天": ("明天", "明日"), "每天": ("每天", "天天"),
    "正在": ("正在", "在"), "没有在": ("没有在",), "会": ("会", "将"), "不会": ("不会",), "的时候": ("的时候", "时"),
}
ZH_VARIATION = 0.5
ZH_VARIANT_RE = re.compile("|".join(sorted(map(re.escape, ZH_VARIANTS), key=len, reverse=True)))   # longest first


def vary(zh: str, rng) -> str:
    """One translator's wording of the Chinese sentence `zh`: each word of ZH_VARIANTS with an alternative
    takes it with probability ZH_VARIATION (one draw per such word, left to right)."""
    def pick(m):
        forms = ZH_VARIANTS[m.group(0)]
        return forms[1] if len(forms) > 1 and rng.random() < ZH_VARIATION else forms[0]
    return ZH_VARIANT_RE.sub(pick, zh)


MIN_WORDS, MAX_WORDS = 3, 12
MAX_LETTERS = 56          # keeps every utterance under the toy Whisper's 6-s window at the slowest rate


def sample_sentence(rng) -> tuple[str, str]:
    """A sentence of 3-12 English words and at most MAX_LETTERS letters (rejection sampling)."""
    while True:
        en, zh = sentence(rng)
        n = len(en.split())
        if MIN_WORDS <= n <= MAX_WORDS and sum(c != " " for c in en) <= MAX_LETTERS:
            return en, zh


# ----------------------------------------------------------------------------------------------------
# 2. The speech synthesizer
# ----------------------------------------------------------------------------------------------------
#
# Source-filter synthesis in the short-time Fourier domain, all in numpy (bit-reproducible, no torch):
# a glottal pulse train (a sawtooth at the pitch contour) and white noise are each transformed
# (20-ms Hann frames, 5-ms hop), multiplied frame by frame by a spectral envelope -- formant resonances
# for the voiced source, a Gaussian band for the noise -- and overlap-added back.
# Every letter is one "phone", a sequence of segments (duration ms, voicing, noise, formants F1-F3,
# noise band centre and width); formants glide between neighbours (coarticulation), and every utterance
# draws its own speaker and manner: pitch, vocal-tract length, rate, loudness, jitter, noise.

SAMPLE_RATE = 16000
SYN_N_FFT, SYN_HOP = 320, 80                   # 20-ms frames, 5-ms hop: 200 envelope frames per second
MAX_SECONDS = 5.9                               # every utterance fits the toy Whisper's 6-s window


def _seg(ms, voice=0.0, noise=0.0, formants=(500, 1500, 2500), band=(1500, 1500)):
    return (ms, voice, noise, formants, band)


_ASP = _seg(15, 0.0, 0.15, band=(1500, 1500))              # aspiration after a voiceless stop
_BAR = (200, 800, 2200)                                    # formants of the voice bar of a voiced closure
LETTERS = {
    # vowels: voiced, formants of the cardinal vowels
    "a": [_seg(80, 1.0, 0.03, (730, 1090, 2440))], "e": [_seg(75, 1.0, 0.03, (530, 1840, 2480))],
    "i": [_seg(70, 1.0, 0.03, (300, 2250, 3000))], "o": [_seg(80, 1.0, 0.03, (570, 840, 2410))],
    "u": [_seg(75, 1.0, 0.03, (320, 870, 2240))], "y": [_seg(65, 0.9, 0.03, (380, 1450, 2100))],
    # sonorants: weaker voicing; nasals weaker still
    "l": [_seg(60, 0.55, 0.0, (360, 1100, 2800))], "r": [_seg(60, 0.55, 0.0, (450, 1250, 1650))],
    "w": [_seg(55, 0.55, 0.0, (300, 650, 2300))], "m": [_seg(65, 0.35, 0.0, (280, 950, 2300))],
    "n": [_seg(65, 0.35, 0.0, (280, 1700, 2600))],
    # fricatives: band noise, voiced ones with a weak buzz
    "s": [_seg(85, 0.0, 0.55, band=(6000, 1200))], "z": [_seg(75, 0.3, 0.35, (250, 1500, 2500), (6000, 1200))],
    "f": [_seg(80, 0.0, 0.22, band=(3500, 3500))], "v": [_seg(65, 0.35, 0.15, (250, 1200, 2400), (3500, 3500))],
    "c": [_seg(85, 0.0, 0.45, band=(2800, 700))], "h": [_seg(55, 0.0, 0.25, band=(1600, 1800))],
    "j": [_seg(35, 0.1, 0.0, _BAR), _seg(45, 0.35, 0.35, (250, 1800, 2600), (2800, 700))],
    # stops: a closure (silent, or a voice bar), a burst whose band tells the place, aspiration if voiceless
    "p": [_seg(40), _seg(15, 0.0, 0.5, band=(900, 700)), _ASP],
    "b": [_seg(40, 0.12, 0.0, _BAR), _seg(15, 0.2, 0.35, (250, 900, 2200), (900, 700))],
    "t": [_seg(40), _seg(15, 0.0, 0.6, band=(4500, 1200)), _ASP],
    "d": [_seg(40, 0.12, 0.0, _BAR), _seg(15, 0.2, 0.4, (250, 1700, 2600), (4500, 1200))],
    "k": [_seg(40), _seg(20, 0.0, 0.55, band=(2000, 500)), _ASP],
    "g": [_seg(40, 0.12, 0.0, _BAR), _seg(20, 0.2, 0.4, (250, 1900, 2400), (2000, 500))],
    "q": [_seg(40), _seg(20, 0.0, 0.5, band=(1700, 500)), _seg(45, 0.55, 0.0, (300, 650, 2300))],
    "x": [_seg(30), _seg(15, 0.0, 0.5, band=(2000, 500)), _seg(60, 0.0, 0.5, band=(6000, 1200))],
}
FORMANT_GAIN = np.array([1.0, 0.5, 0.25])
FORMANT_BW = np.array([90.0, 120.0, 180.0])


@dataclass
class Speaker:
    """What makes one utterance sound unlike another of the same words."""
    f0: float            # Hz, the speaker's mean pitch
    vtl: float           # formant scale: < 1 a longer vocal tract (lower formants)
    rate: float          # speaking-rate multiplier (durations are divided by it)
    snr_db: float        # background noise level
    gain: float          # peak amplitude of the clean speech
    breath: float        # aspiration noise mixed into voicing

    @classmethod
    def draw(cls, rng) -> "Speaker":
        f0 = float(np.exp(rng.uniform(np.log(85), np.log(250))))
        vtl = float(0.88 + 0.25 * np.log(f0 / 85) / np.log(250 / 85) + rng.normal(0, 0.03))
        return cls(f0=f0, vtl=vtl, rate=float(rng.uniform(0.85, 1.2)), snr_db=float(rng.uniform(15, 35)),
                   gain=float(rng.uniform(0.25, 0.7)), breath=float(rng.uniform(0.0, 0.08)))


def _plan(text: str, spk: Speaker, rng) -> list[tuple]:
    """The segments of an utterance: (duration in seconds, voice, noise, formants, band, word loudness,
    what it renders: (a letter, " " between words or "" for the silence before and after, its position
    in the utterance)); the segments of one letter share the position."""
    plan, lead = [], rng.uniform(0.1, 0.3)
    plan.append((lead, 0.0, 0.0, (500, 1500, 2500), (1000, 1000), 1.0, ("", 0)))
    for w, word in enumerate(text.split()):
        if w:
            plan.append((rng.uniform(0.03, 0.08) / spk.rate, 0.0, 0.0, (500, 1500, 2500), (1000, 1000), 1.0,
                         (" ", len(plan))))
        loud = rng.uniform(0.75, 1.25)
        for i, ch in enumerate(word):
            if i and ch == word[i - 1]:          # a doubled letter ("ll") is heard twice: a dip between the two
                _, voice, noise, formants, band = LETTERS[ch][0]
                plan.append((0.025 / spk.rate, voice * 0.1, noise * 0.1, formants, band, loud, ("", len(plan))))
            pos = len(plan)
            for ms, voice, noise, formants, band in LETTERS[ch]:
                dur = ms / 1000 * rng.uniform(0.8, 1.2) / spk.rate
                f = tuple(float(x) * spk.vtl * rng.uniform(0.95, 1.05) for x in formants)
                b = (band[0] * spk.vtl * rng.uniform(0.95, 1.05), band[1])
                plan.append((dur, voice, noise, f, b, loud, (ch, pos)))
    plan.append((rng.uniform(0.1, 0.3), 0.0, 0.0, (500, 1500, 2500), (1000, 1000), 1.0, ("", len(plan))))
    total = sum(p[0] for p in plan)
    if total > MAX_SECONDS:                     # speak faster rather than overflow the window
        plan = [(p[0] * MAX_SECONDS / total, *p[1:]) for p in plan]
    return plan


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average along the first axis (edges padded by repetition)."""
    if width <= 1:
        return x
    pad = np.concatenate([np.repeat(x[:1], width // 2, 0), x, np.repeat(x[-1:], width - 1 - width // 2, 0)])
    c = np.cumsum(np.concatenate([np.zeros_like(x[:1]), pad]), axis=0)
    return (c[width:] - c[:-width]) / width


def _stft_filter(sources: list[np.ndarray], envs: list[np.ndarray]) -> np.ndarray:
    """Sum of sources (N,) each filtered by its time-varying magnitude response (N / hop, bins), row k
    centred on sample k * hop: Hann frames -> rfft -> x envelope -> sum -> irfft -> Hann -> overlap-add."""
    win = np.hanning(SYN_N_FFT + 1)[:-1]                                    # periodic Hann
    k = SYN_N_FFT // SYN_HOP                                                # 4 hops per frame
    n = len(sources[0])
    n_frames = n // SYN_HOP + k - 1                                         # every sample under 4 frames
    idx = np.arange(n_frames)[:, None] * SYN_HOP + np.arange(SYN_N_FFT)     # (frames, n_fft)
    spec = 0
    for src, env in zip(sources, envs):
        # frame i spans src[(i - 3) * hop, (i + 1) * hop), centred on (i - 1) * hop: envelope row i - 1
        env = np.concatenate([env[:1], env, np.repeat(env[-1:], n_frames - 1 - len(env), 0)])
        padded = np.concatenate([np.zeros(SYN_N_FFT - SYN_HOP), src, np.zeros(SYN_N_FFT)])
        spec = spec + np.fft.rfft(padded[idx] * win, axis=1) * env          # (frames, bins)
    frames = (np.fft.irfft(spec, n=SYN_N_FFT, axis=1) * win).reshape(n_frames, k, SYN_HOP)
    out = np.zeros((n_frames + k - 1, SYN_HOP))
    for j in range(k):                                  # block j of frame i lands on output block i + j
        out[j:j + n_frames] += frames[:, j]
    # the squared periodic Hann windows of 4 overlapping frames sum to 1.5 everywhere
    return out.reshape(-1)[SYN_N_FFT - SYN_HOP:SYN_N_FFT - SYN_HOP + n] / 1.5


def synthesize(text: str, rng, speaker: Speaker | None = None, alignment: bool = False):
    """English letters (a-z and spaces) -> a float32 waveform at 16 kHz, peak below 1.

    alignment=True also returns what is heard when: a list of (letter, " " between words or "" for
    silence, start s, end s), one entry per letter.
    """
    spk = speaker or Speaker.draw(rng)
    plan = _plan(text, spk, rng)
    # frame-level tracks: each segment covers the frames of its time span
    bounds = np.round(np.cumsum([0.0] + [p[0] for p in plan]) * SAMPLE_RATE / SYN_HOP).astype(int)
    n_frames = int(bounds[-1]) + 1
    seg_of = np.searchsorted(bounds[1:], np.arange(n_frames), side="right").clip(max=len(plan) - 1)
    voice = np.array([p[1] for p in plan])[seg_of]
    noise = np.array([p[2] for p in plan])[seg_of]
    loud = np.array([p[5] for p in plan])[seg_of]
    formants = _smooth(np.array([p[3] for p in plan])[seg_of], 7)          # ~35 ms glides between phones
    band = np.array([p[4] for p in plan])[seg_of]
    voice, noise = _smooth(voice, 3), _smooth(noise, 3)                     # no clicks at segment edges
    n = n_frames * SYN_HOP
    t = np.arange(n_frames) / n_frames
    # pitch: declination, a slow wobble, the speaker's mean
    wobble = sum(rng.uniform(0.02, 0.06) * np.sin(2 * np.pi * (rng.uniform(0.5, 2.0) * t * n / SAMPLE_RATE
                                                                   + rng.uniform())) for _ in range(2))
    f0_frames = spk.f0 * (1.1 - 0.2 * t) * (1 + wobble)
    f0 = np.interp(np.arange(n) / SYN_HOP, np.arange(n_frames), f0_frames)
    phase = np.cumsum(f0 / SAMPLE_RATE)
    pulses = 2 * (phase % 1.0) - 1                                          # sawtooth: all harmonics, 1/k
    white = rng.standard_normal(n)
    freqs = np.fft.rfftfreq(SYN_N_FFT, 1 / SAMPLE_RATE)                     # (bins,)
    res = 0                                                                 # (frames, bins) formant peaks
    for i in range(3):
        d = (freqs - formants[:, i:i + 1]) / FORMANT_BW[i]
        res = res + FORMANT_GAIN[i] / (1 + d * d)
    env_voice = (voice * loud)[:, None] * res / (1 + freqs / 3000)          # (frames, bins)
    env_noise = (noise * loud)[:, None] * np.exp(-0.5 * ((freqs - band[:, :1]) / band[:, 1:]) ** 2)
    env_noise += (spk.breath * voice * loud)[:, None] * res                 # breathiness
    wav = _stft_filter([pulses, white], [env_voice, env_noise])
    wav *= spk.gain / (np.abs(wav).max() + 1e-9)
    rms = np.sqrt(np.mean(wav ** 2))
    wav += rng.standard_normal(n) * rms * 10 ** (-spk.snr_db / 20)
    wav = np.clip(wav, -0.99, 0.99).astype(np.float32)
    if not alignment:
        return wav
    ends = np.cumsum([p[0] for p in plan])
    units: dict[int, list] = {}
    for p, e in zip(plan, ends):
        (ch, pos), start = p[6], float(e - p[0])
        units.setdefault(pos, [ch, start, float(e)])[2] = float(e)
    return wav, [tuple(u) for u in units.values()]


# ----------------------------------------------------------------------------------------------------
# 3. Sounds for captioning
# ----------------------------------------------------------------------------------------------------
#
# A clip is 1-3 events in sequence; its caption names them in order ("a rising chirp, then two clicks").
# The event labels are also the classes the toy BEATs learns (multi-label, as on AudioSet).

SOUND_LABELS = ["high tone", "low tone", "rising chirp", "falling chirp", "noise burst", "click", "beep",
                "buzz", "speech"]
PHRASES = {"high tone": "a high tone", "low tone": "a low tone", "rising chirp": "a rising chirp",
           "falling chirp": "a falling chirp", "noise burst": "a burst of noise", "buzz": "a buzz",
           "speech": "someone speaking"}
COUNTED = {"click": ("a click", "two clicks", "three clicks"), "beep": ("a beep", "two beeps", "three beeps")}
CONNECTIVES = {1: ["{}"], 2: ["{}, then {}", "{} followed by {}", "{} and then {}"],
               3: ["{}, then {}, then {}", "{}, {} and then {}", "{} followed by {} and {}"]}


def sound_events(rng) -> tuple[list[tuple[str, int]], str]:
    """What a clip holds, [(label, count)], and its caption."""
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    events = []
    for _ in range(n):
        label = SOUND_LABELS[int(rng.integers(len(SOUND_LABELS)))]
        events.append((label, int(rng.integers(1, 4)) if label in COUNTED else 1))
    phrases = [COUNTED[lab][c - 1] if lab in COUNTED else PHRASES[lab] for lab, c in events]
    return events, _pick(rng, CONNECTIVES[n]).format(*phrases)


def _event(rng, label: str, count: int) -> np.ndarray:
    """One event's waveform (float64, peak about 1)."""
    sr = SAMPLE_RATE
    if label in ("high tone", "low tone"):
        t = np.arange(int(rng.uniform(0.3, 0.8) * sr)) / sr
        f = rng.uniform(800, 1500) if label == "high tone" else rng.uniform(150, 350)
        return np.sin(2 * np.pi * f * t) * _fade(len(t))
    if label in ("rising chirp", "falling chirp"):
        dur = rng.uniform(0.3, 0.7)
        t = np.arange(int(dur * sr)) / sr
        lo, hi = rng.uniform(200, 500), rng.uniform(2000, 4000)
        a, b = (lo, hi) if label == "rising chirp" else (hi, lo)
        freq = a * (b / a) ** (t / dur)                                       # exponential sweep
        return np.sin(2 * np.pi * np.cumsum(freq) / sr) * _fade(len(t))
    if label == "noise burst":
        n = int(rng.uniform(0.15, 0.5) * sr)
        return rng.standard_normal(n).clip(-3, 3) / 3 * _fade(n)
    if label == "buzz":
        t = np.arange(int(rng.uniform(0.3, 0.6) * sr)) / sr
        return np.sign(np.sin(2 * np.pi * rng.uniform(80, 150) * t)) * 0.5 * _fade(len(t))
    if label == "speech":                                                     # a few spoken words
        words = " ".join(sample_sentence(rng)[0].split()[:3])
        return synthesize(words, rng).astype(np.float64) / 0.7
    if label == "click":                                                      # 20 ms of decaying noise
        n = int(0.02 * sr)
        unit = rng.standard_normal(n).clip(-3, 3) / 2 * np.exp(-np.arange(n) / (0.004 * sr))
    else:                                                                     # beep
        t = np.arange(int(0.2 * sr)) / sr
        unit = np.sin(2 * np.pi * rng.uniform(1800, 2500) * t) * _fade(len(t))
    gap = np.zeros(int(rng.uniform(0.08, 0.2) * sr))
    return np.concatenate([unit] + [np.concatenate([gap, unit]) for _ in range(count - 1)])


def _fade(n: int, ms: float = 10.0) -> np.ndarray:
    """Raised-cosine edges of `ms`, so that an event starts and stops without a click."""
    k = min(int(ms / 1000 * SAMPLE_RATE), n // 2)
    w = np.ones(n)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / max(k, 1))
    w[:k], w[n - k:] = ramp, ramp[::-1]
    return w


def sound_clip(rng) -> tuple[np.ndarray, str, list[str]]:
    """A clip (float32, 16 kHz, <= MAX_SECONDS), its caption and the labels it holds."""
    events, caption = sound_events(rng)
    pieces = [np.zeros(int(rng.uniform(0.1, 0.4) * SAMPLE_RATE))]
    for label, count in events:
        pieces += [_event(rng, label, count) * rng.uniform(0.3, 0.8), np.zeros(int(rng.uniform(0.1, 0.4) * SAMPLE_RATE))]
    wav = np.concatenate(pieces)[:int(MAX_SECONDS * SAMPLE_RATE)]
    wav = wav + rng.standard_normal(len(wav)) * 10 ** (-rng.uniform(35, 50) / 20)   # a quiet room
    return np.clip(wav, -0.99, 0.99).astype(np.float32), caption, sorted({lab for lab, _ in events})


# ----------------------------------------------------------------------------------------------------
# 4. The world: sizes, splits, audio files, manifests
# ----------------------------------------------------------------------------------------------------

VERSION = 6          # bump when the world's content changes: build() refuses a cached world of another version


@dataclass(frozen=True)
class Sizes:
    """How much of everything. Speech translation is scarce (st_train) next to the LLM's text (llm_*): the
    premise of the paper, that bringing speech into the LLM's text space is what matters."""
    asr_train: int = 2000          # stage 1: ASR
    asr_valid: int = 200
    aac_train: int = 1000          # stage 1: captioning
    aac_valid: int = 100
    asr_test_clean: int = 300      # LibriSpeech-test-clean-like: held-out sentences, quiet (stage 2)
    st_train: int = 1000           # stage 3: speech translation
    st_dev: int = 200
    st_test: int = 300
    mt_test: int = 500             # held-out text MT: the LLM's zero-shot translation
    llm_mt: int = 40000            # the LLM's text: parallel pairs, English, Chinese (captions mixed in)
    llm_en: int = 15000
    llm_zh: int = 15000
    llm_steps: int = 1000          # at the peak learning rate at least; of llm_rows x 128 packed tokens
    llm_max_steps: int = 3000      # at the peak at most, while the LLM does not copy (pretrain_llm)
    llm_decay: int = 250           # then the decay
    llm_warmup: int = 75
    llm_rows: int = 20
    whisper_steps: int = 700       # of whisper_batch utterances (stage 1 can read speech only as well as it hears)
    whisper_batch: int = 16
    beats_steps: int = 300         # fewer than Whisper's: the two train one after the other beside the LLM
    beats_batch: int = 16


SIZES = {
    "full": Sizes(),
    "quick": Sizes(asr_train=160, asr_valid=20, aac_train=80, aac_valid=20, asr_test_clean=40, st_train=80,
                   st_dev=20, st_test=40, mt_test=50, llm_mt=3000, llm_en=1000, llm_zh=1000, llm_steps=40,
                   llm_max_steps=40, llm_decay=20, llm_warmup=2, whisper_steps=40, beats_steps=30),
}
# speech splits in the order their sentences are drawn (held-out first, all distinct): task, split seed code
HELD_OUT = ["st_test", "st_dev", "mt_test", "asr_test_clean", "asr_valid"]
SPLITS = {"asr_train": ("asr", 1), "asr_valid": ("asr", 2), "asr_test_clean": ("asr", 3), "st_train": ("st", 4),
          "st_dev": ("st", 5), "st_test": ("st", 6), "aac_train": ("aac", 7), "aac_valid": ("aac", 8)}


def sentence_streams(seed: int) -> tuple:
    """The world's two random streams for its sentences: the grammar's (English and its translation) and the
    translator's wording (vary), apart so that the wording never changes the English or the speech."""
    return np.random.default_rng([seed, 0]), np.random.default_rng([seed, 0, 1])


def draw_sentences(seed: int, sizes: Sizes) -> dict[str, list[tuple[str, str]]]:
    """Every sentence of the world, by split. Held-out splits (tests, dev, valid) hold distinct sentences
    that no training split and no LLM text contains; training splits may repeat a (short) sentence. Each
    Chinese sentence is one translator's wording of it (vary)."""
    rng, wording = sentence_streams(seed)
    out, seen = {}, set()
    for split in HELD_OUT:
        pairs = []
        while len(pairs) < getattr(sizes, split):
            en, zh = sample_sentence(rng)
            if en not in seen:
                seen.add(en)
                pairs.append((en, vary(zh, wording)))
        out[split] = pairs
    for split in ("asr_train", "st_train", "llm_mt", "llm_en", "llm_zh"):
        pairs = []
        while len(pairs) < getattr(sizes, split):
            en, zh = sample_sentence(rng)
            if en not in seen:
                pairs.append((en, vary(zh, wording)))
        out[split] = pairs
    return out


def _render(job: tuple) -> tuple[dict, dict]:
    """Render one utterance or clip to FLAC; returns its manifest entry and its meta record.
    A pure function of the job, so a process pool renders the same bytes in any order."""
    import soundfile as sf
    root, split, i, seed, text = job
    task, code = SPLITS[split]
    rng = np.random.default_rng([seed, code, i])
    uid = f"{split}-{i:05d}"
    rel = f"audio/{split}/{uid}.flac"
    if task == "aac":
        wav, caption, labels = sound_clip(rng)
        entry = {"id": uid, "audio": rel, "task": "aac", "caption": caption}
        meta = {"id": uid, "labels": labels}
    else:
        en, zh = text
        spk = Speaker.draw(rng)
        if split == "asr_test_clean":          # test-clean: quiet recordings
            spk.snr_db = float(rng.uniform(30, 40))
        wav, align = synthesize(en, rng, spk, alignment=True)
        entry = {"id": uid, "audio": rel, "task": task, "lang": "en"}
        entry.update({"tgt_lang": "zh", "transcript": en, "translation": zh} if task == "st" else {"transcript": en})
        meta = {"id": uid, "speaker": {k: round(v, 4) for k, v in vars(spk).items()},
                "letters": [[c, round(s, 4), round(e, 4)] for c, s, e in align]}
    sf.write(str(Path(root) / rel), wav, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return entry, meta


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_world(out: Path, seed: int, sizes: Sizes, workers: int, sents: dict | None = None) -> dict:
    """The text, audio, manifests and meta files of the world (no models), of `sents` (draw_sentences' by
    default). Returns the sentences."""
    from tqdm import tqdm
    sents = sents or draw_sentences(seed, sizes)
    (out / "text").mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "text" / "mt_train.jsonl", ({"en": e, "zh": z} for e, z in sents["llm_mt"]))
    _write_jsonl(out / "text" / "mt_test.jsonl", ({"en": e, "zh": z} for e, z in sents["mt_test"]))
    (out / "text" / "en.txt").write_text("".join(e + "\n" for e, _ in sents["llm_en"]), encoding="utf-8")
    (out / "text" / "zh.txt").write_text("".join(z + "\n" for _, z in sents["llm_zh"]), encoding="utf-8")
    jobs = []
    for split, (task, _) in SPLITS.items():
        (out / "audio" / split).mkdir(parents=True, exist_ok=True)
        n = getattr(sizes, split)
        jobs += [(str(out), split, i, seed, None if task == "aac" else sents[split][i]) for i in range(n)]
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_render, jobs, chunksize=8), total=len(jobs), desc="audio", unit="clip"))
    else:
        results = [_render(j) for j in tqdm(jobs, desc="audio", unit="clip")]
    (out / "meta").mkdir(exist_ok=True)
    k = 0
    for split in SPLITS:
        n = getattr(sizes, split)
        _write_jsonl(out / f"{split}.jsonl", (r[0] for r in results[k:k + n]))
        _write_jsonl(out / "meta" / f"{split}.jsonl", (r[1] for r in results[k:k + n]))
        k += n
    return sents


def read_meta(out: Path, split: str) -> list[dict]:
    with open(Path(out) / "meta" / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------------
# 5. The base models: tokenizer and LLM
# ----------------------------------------------------------------------------------------------------

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen/Qwen2-7B) and special tokens
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# a second chat task: repeating the English, so that the assistant can answer in English too (what a real
# LLM does when asked to). Its instructions include the ASR ones of model.INSTRUCTIONS, with the English text
# where the speech goes: a real LLM knows what "transcribe" asks for; a toy one knows only what its text
# showed it (without them, stage 1 must also teach the LoRA what the instruction means: slower, probe below)
REPEAT_INSTRUCTIONS = ["Repeat this sentence.", "Say the same sentence again.", "Copy the text exactly.",
                       "Write the sentence down in English."]


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer built like Qwen2's (NFC, Qwen2's split regex, ByteLevel), trained on
    `texts`; the special tokens come after the learnt vocabulary, as in Qwen2. Writes tokenizer.json and
    tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "model_max_length": 512,
        "clean_up_tokenization_spaces": False}, indent=2) + "\n")


def prompt_texts() -> list[str]:
    """The fixed strings of the backbone's chat template and instructions (so BPE learns them too)."""
    from model import INSTRUCTIONS, PROMPTS
    before, after = PROMPTS["qwen2"].split("<SpeechHere>")
    return [before, *(after.format(instruction=i) for v in INSTRUCTIONS.values() for i in v),
            *(after.format(instruction=i) for i in REPEAT_INSTRUCTIONS)]


@dataclass
class LLMCorpus:
    """The LLM's pretraining text: MT pairs, and monolingual English (with captions) and Chinese."""
    mt: list[tuple[str, str]]
    en: list[str]
    zh: list[str]

    @functools.cached_property
    def words(self) -> list[str]:
        """The English words of the parallel text, sorted (for the random-word repeats)."""
        return sorted({w for en, _ in self.mt for w in en.split()})


# the LLM's pretraining documents by kind, and their shares (see llm_documents). Reading a source in order
# (what ASR from the speech slot needs) is the slowest skill to appear: with few repeats the model learns
# to print a likely English sentence whatever the source says; repeats of random word strings, which no
# language model can guess, teach it to copy (teacher-forced copy accuracy 0.93 against 0.45 with 5% sentence
# repeats at 600 steps). Stage 1 learns from that skill, but only once the source looks like speech to the
# LLM: with plain repeats alone, stage 1 stalled on seed 1's LLM even when it copied text well. The stretched
# repeats (a source token held for 1-3 positions, pauses after it, as the bridge's 0.16-s windows lay a word
# out) fixed it: on seed 1's world, asr_valid accuracy 0.854 at stage-1 step 1,000 against 0.613 (REPRODUCTION.md).
# Translation (st, lines) has a small share: once stage 1 reads speech well, the base speech translation
# scores about what the LLM scores on text, and an LLM at BLEU 92 put seed 0's base at 77, above the toy's
# band of 20-70 where differences show. The free variation in the Chinese (ZH_VARIANTS) now caps it as well.
LLM_MIX = {"randrep": 0.10, "st": 0.10, "repeat": 0.33, "stretch": 0.16, "lines": 0.05, "en": 0.09, "zh": 0.17}


def llm_documents(corpus: LLMCorpus, prompter, tok, rng, n: int, mix: dict | None = None) -> list[list[int]]:
    """`n` training documents (token ids, each ending with <|endoftext|>), drawn from the corpus by LLM_MIX:
      st:      en->zh translation in the chat template, the English where the speech goes (as in the text
               pass of the joint stage): what zero-shot MT and the speech pass build on;
      repeat:  "repeat this sentence" (REPEAT_INSTRUCTIONS, ASR's) in the template: the English back;
      randrep: the same with 3-12 random English words instead of a sentence: copying, not guessing;
      stretch: the same (a sentence or random words, half each) with the source laid out as speech comes
               out of the bridge: each token held for 1-3 positions (a word spans several 0.16-s windows),
               then 0-20 pause tokens (the rest of the clip's 6 s): reading a source at its own pace;
      lines:   parallel text, four "english = 中文" lines (four pairs for the price of one template);
      en, zh:  English text, Chinese text (four to seven sentences each)."""
    from model import INSTRUCTIONS
    eot, pause = tok.token_id("<|endoftext|>"), tok.encode(" ")
    kinds, bounds = list((mix or LLM_MIX)), np.cumsum(list((mix or LLM_MIX).values()))
    docs = []
    for _ in range(n):
        kind = kinds[min(int(np.searchsorted(bounds, rng.random(), side="right")), len(kinds) - 1)]
        if kind in ("st", "repeat", "randrep", "stretch"):
            en, zh = corpus.mt[int(rng.integers(len(corpus.mt)))]
            if kind == "randrep" or (kind == "stretch" and rng.random() < 0.5):
                en = " ".join(corpus.words[int(i)] for i in rng.integers(len(corpus.words), size=rng.integers(3, 13)))
            instr, target = ((_pick(rng, INSTRUCTIONS["st_en_zh"]), zh) if kind == "st"
                             else (_pick(rng, REPEAT_INSTRUCTIONS + INSTRUCTIONS["asr"]), en))
            source = tok.encode(en)
            if kind == "stretch":
                held = rng.choice([1, 2, 3], size=len(source), p=[0.3, 0.4, 0.3])
                source = [t for t, k in zip(source, held) for _ in range(k)] + pause * int(rng.integers(0, 21))
            docs.append(prompter.build([instr], [source], [target]).input_ids[0].tolist() + [eot])
        elif kind == "lines":
            pairs = [corpus.mt[int(i)] for i in rng.integers(len(corpus.mt), size=4)]
            docs.append(tok.encode("\n".join(f"{en} = {zh}" for en, zh in pairs)) + [eot])
        else:
            pool, sep = (corpus.en, "\n") if kind == "en" else (corpus.zh, "")
            k = int(rng.integers(4, 8))
            docs.append(tok.encode(sep.join(pool[int(i)] for i in rng.integers(len(pool), size=k))) + [eot])
    return docs


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# pretrain_llm holds the peak learning rate until the LLM copies st_dev's English this well (eval_copy's
# teacher-forced accuracy), checked every LLM_CHECK_EVERY steps. When copying appears varies with the seed: with
# a fixed 1,500-step schedule seed 2's LLM copied held-out sentences at 0.63 and stage 1 stalled on it
# (asr_valid accuracy 0.606 at step 1,000), while seeds 0 and 1 copied at 0.86 and 0.92; pretrained longer
# (2,500 steps, copying at 0.975) seed 2's LLM let stage 1 reach 0.913 at step 1,000.
LLM_COPY = 0.9
LLM_CHECK_EVERY = 125


def packed_rows(corpus: LLMCorpus, tok, rng, rows: int, seq: int):
    """An endless stream of (rows, seq) token batches: documents laid end to end and cut into rows, as
    LLMs are pretrained (no padding; a document may continue on the next row)."""
    import torch
    from model import Prompter
    prompter = Prompter(tok, "qwen2")
    buf: list[int] = []
    while True:
        while len(buf) < rows * seq:
            for d in llm_documents(corpus, prompter, tok, rng, 16):
                buf += d
        yield torch.tensor(buf[:rows * seq]).view(rows, seq)
        buf = buf[rows * seq:]


def pretrain_llm(llm, batches, sizes: Sizes, lr: float, copy_check=None, bar_position: int = 0,
                 threads=None) -> dict:
    """Next-token prediction on packed rows of `packed_rows` (AdamW): a linear warm-up, the peak learning rate
    for sizes.llm_steps steps and on, every LLM_CHECK_EVERY steps, until copy_check(llm) (teacher-forced copy
    accuracy, eval_copy) reaches LLM_COPY or sizes.llm_max_steps pass, then sizes.llm_decay steps of cosine
    decay to a tenth of the peak. threads(), asked before every step, is the torch thread count to train
    with (build: one beside the encoders, then every core); the weights do not depend on when it changes
    (test_pretrain_llm_bytes_do_not_depend_on_threads).
    Returns the steps, those at the peak and the checks."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm
    decay = [p for n, p in llm.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in llm.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    bar = tqdm(total=sizes.llm_steps + sizes.llm_decay, desc="LLM (text + MT)", unit="step", position=bar_position)
    checks, step, decay_from = [], 0, None
    llm.train()
    while decay_from is None or step < decay_from + sizes.llm_decay:
        if decay_from is None and step >= sizes.llm_steps:
            if copy_check is None or step >= sizes.llm_max_steps:
                decay_from = step
            elif (step - sizes.llm_steps) % LLM_CHECK_EVERY == 0:
                llm.eval()
                checks.append((step, copy_check(llm)))
                llm.train()
                if checks[-1][1] >= LLM_COPY:
                    decay_from = step
                else:
                    bar.total += min(LLM_CHECK_EVERY, sizes.llm_max_steps - step)
                    bar.refresh()
        if decay_from is None:
            rate = lr * min(1.0, (step + 1) / sizes.llm_warmup)
        else:
            rate = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - decay_from) / sizes.llm_decay)))
        for g in opt.param_groups:
            g["lr"] = rate
        if threads is not None and (n := threads()) != torch.get_num_threads():
            torch.set_num_threads(n)
        ids = next(batches)                                                   # (B, T)
        logits = llm(ids).logits[:, :-1]                                      # (B, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", **({"copy": f"{checks[-1][1]:.3f}"} if checks else {}))
    bar.close()
    llm.eval()
    return {"steps": step, "peak_steps": decay_from,
            "copy_checks": [{"step": k, "copy_sentences": round(c, 4)} for k, c in checks]}


def translate(llm, tok, sources: list[str], batch: int = 64, num_beams: int = 1) -> list[str]:
    """Zero-shot text translation: the English where the speech goes, the first ST instruction."""
    import torch
    from model import INSTRUCTIONS, Prompter
    prompter = Prompter(tok, "qwen2")
    out = []
    with torch.no_grad():
        for i in range(0, len(sources), batch):
            chunk = sources[i:i + batch]
            b = prompter.build([INSTRUCTIONS["st_en_zh"][0]] * len(chunk), [tok.encode(s) for s in chunk],
                               pad_left=True)
            ids = llm.generate(b.input_ids, attention_mask=b.attention_mask, num_beams=num_beams,
                               max_new_tokens=48, eos_token_id=prompter.stop_ids)
            out += [tok.decode(r).strip() for r in ids]
    return out




TOKENIZER_VOCAB = 1024
# the toy LLM: Qwen2's architecture (q/k/v biases, grouped-query attention, SwiGLU, untied head), tiny
TOY_LLM = dict(hidden_size=96, intermediate_size=288, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512)
# a peak of 2e-3 copies better than 3e-3 after pretraining (random words 0.763 / 0.916 against 0.567 / 0.786 on
# seeds 0 / 2 of world version 5) in about as many steps, and seed 0's stage 1 then reads at WER 12.4% against
# 15.9%; it translates text worse (MT BLEU 33.5 / 46.7 against 50.4 / 50.6): REPRODUCTION.md, how the toy got here
LLM_SEQ, LLM_LR = 128, 2e-3


def llm_corpus(sents: dict, seed: int) -> LLMCorpus:
    """The LLM's text: the parallel pairs, and English (one line in ten a sound caption) and Chinese."""
    rng = np.random.default_rng([seed, 10])
    captions = [sound_events(rng)[1] for _ in range(len(sents["llm_en"]) // 10)]
    return LLMCorpus(mt=sents["llm_mt"], en=[e for e, _ in sents["llm_en"]] + captions,
                     zh=[z for _, z in sents["llm_zh"]])


def build_tokenizer(corpus: LLMCorpus, out: Path) -> None:
    """Train the LLM's byte-level BPE tokenizer on (part of) the corpus and the prompts; write it to `out`."""
    n = min(len(corpus.mt), 8000)
    train_tokenizer([e for e, _ in corpus.mt[:n]] + [z for _, z in corpus.mt[:n]] + corpus.en[-n // 10:]
                    + prompt_texts() * max(1, n // 10), out, TOKENIZER_VOCAB)


def build_llm(corpus: LLMCorpus, out: Path, seed: int, sizes: Sizes, dev: list[str], report: Path,
              bar_position: int = 0, threads=None):
    """Pretrain the LLM (the tokenizer already in `out`; `threads` as pretrain_llm's), its copy checks on the
    English sentences `dev`, save it in Qwen2's layout and its steps and checks in `report` (JSON).
    Returns (llm, tokenizer)."""
    import torch
    from model import LLM, LLMConfig, load_tokenizer
    tok = load_tokenizer(out)
    vocab = (tok.tok.get_vocab_size() + 63) // 64 * 64       # padded like Qwen2's (152064 = 64 x 2376)
    torch.manual_seed(seed)
    llm = LLM(LLMConfig(vocab_size=vocab, qkv_bias=True, family="qwen2", **TOY_LLM))
    with torch.no_grad():       # HF's Qwen2 initialisation (initializer_range 0.02), not PyTorch's defaults
        for name, p in llm.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02)
    rng = np.random.default_rng([seed, 11])
    done = pretrain_llm(llm, packed_rows(corpus, tok, rng, sizes.llm_rows, LLM_SEQ), sizes, LLM_LR,
                        lambda m: eval_copy(m, tok, dev, corpus.words, seed)["copy_sentences"], bar_position,
                        threads)
    save_llm(llm, tok, out)
    report.write_text(json.dumps(done) + "\n")
    return llm, tok


# Intel MKL's matrix products split their sums over threads differently at 1 and at 2 threads on AVX-512 (seen on
# an Intel Xeon: the weight gradient's product differs in its last bits; not on the AMD EPYC of the earlier rounds),
# so the LLM's weights would depend on when it gets the second core. MKL's strict conditional numerical
# reproducibility (MKL_CBWR=AUTO,STRICT, read when MKL starts) makes its products the same at any thread count;
# it costs the LLM's step about 3% there (168-178 against 183-184 ms on one thread, 99-106 against 105-106 on two).
LLM_PROCESS_ENV = {"MKL_CBWR": "AUTO,STRICT"}


def start_llm_process(ctx, target, args):
    """ctx.Process(target=target, args=args) started with LLM_PROCESS_ENV in its environment (this process's own
    environment is left as it was)."""
    saved = {k: os.environ.get(k) for k in LLM_PROCESS_ENV}
    os.environ.update(LLM_PROCESS_ENV)
    try:
        proc = ctx.Process(target=target, args=args)
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return proc


def _build_llm_process(corpus: LLMCorpus, out: Path, seed: int, sizes: Sizes, dev: list[str], report: Path,
                       alone, cores: int) -> None:
    """build_llm in a spawned process: on one core while the parent renders the audio and trains the
    encoders on the other, on `cores` once the parent sets the event `alone`."""
    import torch
    torch.set_num_threads(1)
    build_llm(corpus, out, seed, sizes, dev, report, bar_position=1, threads=lambda: cores if alone.is_set() else 1)


def save_llm(llm, tok, out: Path, n_shards: int = 2) -> None:
    """Qwen2's public layout: config.json, model-0000N-of-0000M.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file
    cfg = llm.config
    sd = {k: v.detach().contiguous() for k, v in llm.state_dict().items()
          if not (cfg.tie_word_embeddings and k == "lm_head.weight")}     # tied: HF saves the embedding only
    total = sum(t.numel() * t.element_size() for t in sd.values())
    shards, size = [dict() for _ in range(n_shards)], 0
    for k, t in sd.items():                                  # in order, split by size like HF's save_pretrained
        shards[min(n_shards - 1, int(size * n_shards // total))][k] = t
        size += t.numel() * t.element_size()
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    eos = tok.token_id("<|endoftext|>")
    (out / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": cfg.num_hidden_layers, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "bos_token_id": eos, "eos_token_id": eos,
        "torch_dtype": "float32"}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------
# 6. The base models: Whisper encoder (letters and tokens) and BEATs (sound events and tokens)
# ----------------------------------------------------------------------------------------------------

# Whisper's architecture at a 6-s window: 600 mel frames in, 300 frames out at 50 Hz
TOY_WHISPER = dict(d_model=64, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=256, num_mel_bins=80,
                   max_source_positions=300)
WHISPER_LR = 6e-3
# the official BEATs cfg fields, iter3+'s structure (deep norm, gated relative bias), tiny
TOY_BEATS = dict(input_patch_size=16, embed_dim=64, conv_bias=False, encoder_layers=2, encoder_embed_dim=64,
                 encoder_ffn_embed_dim=128, encoder_attention_heads=4, activation_fn="gelu",
                 layer_wise_gradient_decay_ratio=1.0, layer_norm_first=False, deep_norm=True, dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.0,
                 conv_pos=16, conv_pos_groups=4, relative_position_embedding=True, num_buckets=64,
                 max_distance=256, gru_rel_pos=True, finetuned_model=True, predictor_dropout=0.0,
                 predictor_class=len(SOUND_LABELS))
BEATS_LR = 3e-3
BEATS_PATCH_FRAMES, BEATS_PATCH_BANDS = 16, 8      # a patch: 16 fbank frames x 16 of the 128 bins
BEATS_PATCH_S = BEATS_PATCH_FRAMES * 0.01          # fbank frames come every 10 ms: a patch is 0.16 s
CTC_ALPHABET = "_ abcdefghijklmnopqrstuvwxyz"     # index 0 is CTC's blank
WHISPER_FRAME_S = 0.02                            # the encoder's output rate: 50 frames per second


def ctc_path(letters: list, n_out: int):
    """The synthesizer's alignment -> a CTC path of n_out labels at 50 Hz: each frame the letter (or space)
    heard at its centre, blank in silence, and a blank on the first frame of a letter that repeats the
    previous one ("ll"), so that collapsing the path gives back the text. Training on it is CTC trained on
    a known alignment (Viterbi training), which converges far faster than CTC's sum over all paths."""
    import torch
    path = torch.zeros(n_out, dtype=torch.long)
    prev = None
    for ch, start, end in letters:
        a, b = int(round(start / WHISPER_FRAME_S)), min(n_out, int(round(end / WHISPER_FRAME_S)))
        if not ch or b <= a:
            continue
        path[a:b] = CTC_ALPHABET.index(ch)
        if ch == prev:
            path[a] = 0
        prev = ch
    return path


def ctc_decode(logits) -> list[str]:
    """Greedy CTC: the best label per frame, repeats merged, blanks dropped."""
    out = []
    for row in logits.argmax(-1).tolist():
        chars, prev = [], 0
        for k in row:
            if k != prev and k != 0:
                chars.append(CTC_ALPHABET[k])
            prev = k
        out.append(" ".join("".join(chars).split()))
    return out


def _tokenizer(path: str):
    """The LLM's `tokenizers.Tokenizer` at `path`, read once per process and file version (a rebuilt world
    writes a new one at the same path)."""
    return _read_tokenizer(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_tokenizer(path: str, mtime_ns: int):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(path)


def _speech_items(world: Path) -> list[tuple[str, list]]:
    """The training splits' utterances (asr_train, st_train) as (FLAC path, the letters' timing from meta/)."""
    return [(str(world / "audio" / split / f"{m['id']}.flac"), m["letters"])
            for split in ("asr_train", "st_train") for m in read_meta(world, split)]


def token_frames(tok, letters: list, n_out: int, frame_s: float):
    """The LLM token being spoken at the centre of each of n_out frames of frame_s seconds: its id + 1, or 0
    in silence. `tok` is the LLM's `tokenizers.Tokenizer`, `letters` the synthesizer's alignment. Frame
    labels in the LLM's vocabulary, as the CTC path is in letters: the toy encoders' stand-in for what real
    ones learn from hundreds of thousands of hours (features from which a bridge can read the words)."""
    import torch
    chars = [(ch, start, end) for ch, start, end in letters if ch]
    enc = tok.encode("".join(ch for ch, _, _ in chars), add_special_tokens=False)
    centres = (torch.arange(n_out) + 0.5) * frame_s
    out = torch.zeros(n_out, dtype=torch.long)
    for tid, (c0, c1) in zip(enc.ids, enc.offsets):
        out[(centres >= chars[c0][1]) & (centres < chars[c1 - 1][2])] = tid + 1
    return out


class WhisperBatches:
    """Batch i of the encoder's pretraining: utterances of the training splits (FLAC + their letters'
    timing from meta/), each epoch in a seeded order; a map-style dataset of whole batches, so that a
    DataLoader worker reads and computes log-mels while the main process trains. A batch is the log-mels,
    the CTC paths (letters) and the token frame labels (the LLM tokenizer at `tokenizer`)."""

    def __init__(self, items: list[tuple[str, list]], batch: int, seed: int, n_frames: int, tokenizer: str):
        self.items, self.batch, self.seed, self.n_frames, self.tokenizer = items, batch, seed, n_frames, tokenizer
        self.cache: dict[int, tuple] = {}       # utterance -> its three tensors (each epoch sees them again)

    def __getitem__(self, i: int):
        import torch
        per_epoch = len(self.items) // self.batch
        epoch, k = divmod(i, per_epoch)
        order = np.random.default_rng([self.seed, 20, epoch]).permutation(len(self.items))
        rows = [self._utterance(int(j)) for j in order[k * self.batch:(k + 1) * self.batch]]
        return tuple(torch.stack(column) for column in zip(*rows))

    def _utterance(self, j: int) -> tuple:
        """(log-mel, CTC path, token frames) of utterance j; a log-mel is computed per clip either way
        (data._by_rows), so one computed alone equals one computed in a batch."""
        if j not in self.cache:
            import data
            path, letters = self.items[j]
            n = self.n_frames // 2
            tok = _tokenizer(self.tokenizer)
            self.cache[j] = (data.log_mel_spectrogram(data.load_audio(path), n_frames=self.n_frames),
                             ctc_path(letters, n), token_frames(tok, letters, n, WHISPER_FRAME_S))
        return self.cache[j]


class SoundBatches:
    """Batch i of BEATs' pretraining, a pure function of (seed, i): fresh sound clips (15% of them speech,
    labelled "speech") for the sound events, and half as many utterances of the training splits with the
    LLM token under each 16-frame (0.16-s) patch (`token_frames`) for the speech."""

    def __init__(self, sentences: list[str], batch: int, seed: int, speech: list[tuple[str, list]], tokenizer: str):
        self.sentences, self.batch, self.seed, self.speech, self.tokenizer = sentences, batch, seed, speech, tokenizer

    def __getitem__(self, i: int):
        import torch
        import data
        rng = np.random.default_rng([self.seed, 21, i])
        clips = []
        for _ in range(self.batch):
            if rng.random() < 0.15:
                clips.append((synthesize(self.sentences[int(rng.integers(len(self.sentences)))], rng), ["speech"]))
            else:
                wav, _, labels = sound_clip(rng)
                clips.append((wav, labels))
        wavs, mask = data.pad_batch([torch.from_numpy(w) for w, _ in clips])
        labels = torch.tensor([[float(lab in c[1]) for lab in SOUND_LABELS] for c in clips])
        tok = _tokenizer(self.tokenizer)
        chosen = [self.speech[int(j)] for j in rng.integers(len(self.speech), size=max(1, self.batch // 2))]
        speech, speech_mask = data.pad_batch([data.load_audio(path) for path, _ in chosen])
        fbank = data.beats_fbank(speech, speech_mask)                          # (B, T, 128)
        n_patches = fbank.shape[1] // BEATS_PATCH_FRAMES
        tokens = torch.stack([token_frames(tok, letters, n_patches, BEATS_PATCH_S) for _, letters in chosen])
        return (data.beats_fbank(wavs, mask), mask, labels), (fbank, speech_mask, tokens)


def _loader(dataset, steps: int, workers: int):
    """Batches 0..steps-1 of a map-style dataset of batches, prepared by `workers` processes."""
    import torch
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(steps), num_workers=workers,
                                            prefetch_factor=4 if workers else None))


def _train(params, steps: int, lr: float, desc: str, loss_fn, batches):
    """AdamW with warm-up and cosine decay over `steps` batches; loss_fn(batch) -> scalar loss."""
    import torch
    from tqdm import tqdm
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, max(1, steps // 10))
        loss = loss_fn(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")


def build_whisper(out: Path, world: Path, seed: int, sizes: Sizes, workers: int, tokenizer: Path):
    """Pretrain the Whisper-architecture encoder on the training splits' speech, with two heads: CTC on
    letters (its quality, CER/WER, is reported) and the LLM token at each frame (`token_frames`); save it in
    HF's layout (config.json + model.safetensors with model.encoder.* keys; the CTC head beside it)."""
    import torch
    import torch.nn.functional as F
    from model import WhisperEncoder, WhisperEncoderConfig
    torch.manual_seed(seed)
    enc = WhisperEncoder(WhisperEncoderConfig(**TOY_WHISPER)).requires_grad_(True)   # built frozen
    head = torch.nn.Linear(enc.config.d_model, len(CTC_ALPHABET))
    token_head = torch.nn.Linear(enc.config.d_model, _tokenizer(str(tokenizer)).get_vocab_size() + 1)
    items = _speech_items(world)
    data_ = WhisperBatches(items, min(sizes.whisper_batch, len(items)), seed, enc.config.n_frames, str(tokenizer))

    def loss_fn(batch):
        mel, path, tokens = batch
        h = enc(mel)                                                            # (B, T, C)
        return (F.cross_entropy(head(h).flatten(0, 1), path.flatten())          # (B*T, letters) vs (B*T,)
                + F.cross_entropy(token_head(h).flatten(0, 1), tokens.flatten()))

    params = ([p for n, p in enc.named_parameters() if n != "embed_positions.weight"] + list(head.parameters())
              + list(token_head.parameters()))
    _train(params, sizes.whisper_steps, WHISPER_LR, "Whisper (letters, tokens)", loss_fn,
           _loader(data_, sizes.whisper_steps, workers))
    enc.requires_grad_(False)
    head.requires_grad_(False)
    save_whisper(enc, head, out)
    return enc, head


def save_whisper(enc, head, out: Path) -> None:
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    c = enc.config
    save_file({f"model.encoder.{k}": v.contiguous() for k, v in enc.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file({"weight": head.weight.contiguous(), "bias": head.bias.contiguous()}, str(out / "ctc_head.safetensors"),
              metadata={"alphabet": CTC_ALPHABET})   # one key: safetensors orders several at random
    # an HF WhisperConfig; the checkpoint holds the encoder only (the toy has no decoder: a WhisperModel
    # built from it gets a random decoder, with transformers' warning about the missing keys)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", "d_model": c.d_model,
        "encoder_layers": c.encoder_layers, "encoder_attention_heads": c.encoder_attention_heads,
        "encoder_ffn_dim": c.encoder_ffn_dim, "decoder_layers": 1, "decoder_attention_heads": c.encoder_attention_heads,
        "decoder_ffn_dim": c.encoder_ffn_dim, "num_mel_bins": c.num_mel_bins,
        "max_source_positions": c.max_source_positions, "max_target_positions": 64, "vocab_size": 64,
        "activation_function": "gelu", "scale_embedding": False, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "decoder_start_token_id": 3, "torch_dtype": "float32"}, indent=2) + "\n")


def beats_logits(beats, head, fbank, mask):
    """The fine-tuned BEATs' clip logits: the predictor on every token, averaged over the real tokens."""
    x, pad = beats(fbank, mask)                                              # (B, T', C), (B, T')
    logits = head(x)                                                         # (B, T', classes)
    if pad is None:
        return logits.mean(1)
    keep = (~pad).unsqueeze(-1).to(logits.dtype)
    return (logits * keep).sum(1) / keep.sum(1)


def build_beats(path: Path, world: Path, sentences: list[str], seed: int, sizes: Sizes, workers: int,
                tokenizer: Path):
    """Pretrain the BEATs-architecture encoder to recognise the toy sounds (multi-label, binary cross-entropy
    per class, as BEATs is fine-tuned on AudioSet) and, since the real BEATs has heard speech (AudioSet is
    about half speech) and SALMONN feeds its features on speech to the Q-Former too, the LLM token under each
    patch of the training speech (without this its half of every fused frame is noise on speech, and the
    toy's stage 1 stalls); save the official checkpoint file (with the sound classifier only)."""
    import torch
    import torch.nn.functional as F
    from model import BEATs, BEATsConfig
    torch.manual_seed(seed)
    beats = BEATs(BEATsConfig.from_checkpoint_cfg(TOY_BEATS)).requires_grad_(True)   # built frozen
    head = torch.nn.Linear(beats.config.encoder_embed_dim, len(SOUND_LABELS))      # the official `predictor`
    token_head = torch.nn.Linear(beats.config.encoder_embed_dim, _tokenizer(str(tokenizer)).get_vocab_size() + 1)

    def loss_fn(batch):
        (fbank, mask, labels), (speech_fbank, speech_mask, tokens) = batch
        x, pad = beats(speech_fbank, speech_mask)                              # (B, 8 * patches, C): 8 bands
        target = tokens.repeat_interleave(BEATS_PATCH_BANDS, dim=1)[:, :x.shape[1]]   # each band: its time's token
        if pad is not None:
            target = target.masked_fill(pad, -100)
        return (F.binary_cross_entropy_with_logits(beats_logits(beats, head, fbank, mask), labels)
                + F.cross_entropy(token_head(x).flatten(0, 1), target.flatten(), ignore_index=-100))

    data_ = SoundBatches(sentences, sizes.beats_batch, seed, _speech_items(world), str(tokenizer))
    params = list(beats.parameters()) + list(head.parameters()) + list(token_head.parameters())
    _train(params, sizes.beats_steps, BEATS_LR, "BEATs (sounds, speech)", loss_fn,
           _loader(data_, sizes.beats_steps, workers))
    beats.requires_grad_(False)
    head.requires_grad_(False)
    save_beats(beats, head, path)
    return beats, head


def save_beats(beats, head, path: Path) -> None:
    """The official layout {'cfg', 'model', 'label_dict'}: the positional conv weight-normalised
    (weight = g * v / ||v||, the norm over dims 0 and 1 per kernel tap) and the classifier as predictor.*.
    Storing v = weight and g = ||weight|| makes the loader's g / ||v|| exactly 1: it gets the weight back."""
    import torch
    sd = {k: v.detach().clone() for k, v in beats.state_dict().items()}
    w = sd.pop("encoder.pos_conv.0.weight")                                 # (C, C/groups, K)
    sd["encoder.pos_conv.0.weight_g"] = w.norm(dim=(0, 1), keepdim=True)     # (1, 1, K)
    sd["encoder.pos_conv.0.weight_v"] = w
    sd["predictor.weight"], sd["predictor.bias"] = head.weight.detach().clone(), head.bias.detach().clone()
    torch.save({"cfg": dict(TOY_BEATS), "model": sd, "label_dict": dict(enumerate(SOUND_LABELS))}, str(path))


# ----------------------------------------------------------------------------------------------------
# 7. Quality of the base models, the build, the command line
# ----------------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_llm(llm, tok, pairs: list[tuple[str, str]]) -> dict:
    """Zero-shot text MT on held-out pairs: greedy, BLEU with sacrebleu's zh tokenizer (as CoVoST 2 En-Zh)."""
    import sacrebleu
    hyps = translate(llm, tok, [e for e, _ in pairs])
    bleu = sacrebleu.BLEU(tokenize="zh")
    score = bleu.corpus_score(hyps, [[z for _, z in pairs]])
    return {"mt_bleu": round(score.score, 2), "signature": str(bleu.get_signature()), "n": len(pairs),
            "decoding": "greedy", "examples": [{"en": e, "ref": z, "hyp": h} for (e, z), h in list(zip(pairs, hyps))[:5]]}


def eval_copy(llm, tok, sentences: list[str], words: list[str], seed: int, n: int = 200) -> dict:
    """How well the LLM copies: teacher-forced next-token accuracy of its answer when asked to repeat English
    given where the speech goes (the first ASR instruction, as stage 1 asks), on the first `n` held-out
    `sentences` and on `n` strings of 3-12 random `words`, which no language model can guess. Stage 1 reads
    speech through this skill, though it is not all stage 1 needs (REPRODUCTION.md). (SpeechLLM._ce scores the
    same positions, but on a speech LLM's hidden states; this needs the bare LLM.)"""
    import torch
    from model import INSTRUCTIONS, Prompter
    prompter = Prompter(tok, "qwen2")
    rng = np.random.default_rng([seed, 12])
    texts = {"sentences": sentences[:n],
             "random_words": [" ".join(words[int(i)] for i in rng.integers(len(words), size=rng.integers(3, 13)))
                              for _ in range(n)]}
    out = {}
    with torch.no_grad():
        for name, lines in texts.items():
            right = total = 0
            for i in range(0, len(lines), 50):
                chunk = lines[i:i + 50]
                b = prompter.build([INSTRUCTIONS["asr"][0]] * len(chunk), [tok.encode(t) for t in chunk], chunk)
                pred = llm(b.input_ids, attention_mask=b.attention_mask, logits="all").logits[:, :-1].argmax(-1)
                labels = b.labels[:, 1:]
                keep = labels != -100
                right += (pred[keep] == labels[keep]).sum().item()
                total += keep.sum().item()
            out[f"copy_{name}"] = round(right / total, 4)
    return {**out, "copy_n": {name: len(lines) for name, lines in texts.items()}}


def eval_whisper(enc, head, world: Path, split: str = "asr_test_clean") -> dict:
    """Greedy CTC decoding (no language model) of a manifest's speech: character and word error rates."""
    import jiwer
    import torch
    import data
    entries = _read_jsonl(world / f"{split}.jsonl")
    refs, hyps = [e["transcript"] for e in entries], []
    with torch.no_grad():
        for i in range(0, len(entries), 32):
            wavs = [data.load_audio(world / e["audio"]) for e in entries[i:i + 32]]
            hyps += ctc_decode(head(enc(data.log_mel_spectrogram(wavs, n_frames=enc.config.n_frames))))
    return {"cer": round(100 * jiwer.cer(refs, hyps), 2), "wer": round(100 * jiwer.wer(refs, hyps), 2),
            "split": split, "n": len(refs), "decoding": "greedy CTC, no language model",
            "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:5]]}


def eval_beats(beats, head, world: Path, split: str = "aac_valid") -> dict:
    """Sound-event recognition on a captioning split (threshold 0.5): clips with exactly the right set of
    labels, and the accuracy of each label decision."""
    import torch
    import data
    entries = _read_jsonl(world / f"{split}.jsonl")
    truth = torch.tensor([[float(lab in m["labels"]) for lab in SOUND_LABELS] for m in read_meta(world, split)])
    preds = []
    with torch.no_grad():
        for i in range(0, len(entries), 32):
            wavs, mask = data.pad_batch([data.load_audio(world / e["audio"]) for e in entries[i:i + 32]])
            preds.append(beats_logits(beats, head, data.beats_fbank(wavs, mask), mask) > 0)
    pred = torch.cat(preds).float()
    return {"exact_match": round(100 * (pred == truth).all(1).float().mean().item(), 2),
            "label_accuracy": round(100 * (pred == truth).float().mean().item(), 2), "split": split,
            "n": len(entries), "labels": SOUND_LABELS}


PATHS = {"llm": "models/qwen2-toy", "whisper": "models/whisper-toy", "beats": "models/beats-toy.pt",
         **{split: f"{split}.jsonl" for split in SPLITS}}


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def build(out: str | os.PathLike, seed: int = 0, quick: bool = False, sizes: Sizes | None = None,
          workers: int | None = None, force: bool = False) -> Path:
    """Build the world in `out` (text, audio, manifests, pretrained base models, their quality), or return
    at once if `out` already holds this world (world.json, written last, with the same seed and sizes)."""
    import torch
    from model import LLM, load_tokenizer
    out = Path(out)
    sizes = sizes or SIZES["quick" if quick else "full"]
    settings = {"version": VERSION, "seed": seed, "sizes": vars(sizes)}
    info = out / "world.json"
    if info.is_file() and not force:
        old = json.loads(info.read_text())
        if {k: old.get(k) for k in settings} == settings:
            print(f"toy world (seed {seed}) already built in {out}")
            return out
        raise FileExistsError(f"{info}: {out} holds another toy world (seed {old.get('seed')}, version "
                              f"{old.get('version')}, other sizes?); pass --force to rebuild it, or another --out")
    workers = (os.cpu_count() or 1) if workers is None else workers
    out.mkdir(parents=True, exist_ok=True)
    info.unlink(missing_ok=True)
    times, t0 = {}, time.time()

    # the LLM needs only the text: it starts first, in its own process on one core, while this one renders the
    # audio and trains the encoders on the other; then it takes every core (its weights are the same either way)
    sents = draw_sentences(seed, sizes)
    corpus = llm_corpus(sents, seed)
    llm_dir = out / PATHS["llm"]
    build_tokenizer(corpus, llm_dir)
    t_llm, llm_proc = time.time(), None
    dev, llm_report = [e for e, _ in sents["st_dev"]], out / "llm_pretraining.json"      # the LLM's copy checks
    if workers > 1:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        alone = ctx.Event()
        llm_proc = start_llm_process(ctx, _build_llm_process, (corpus, llm_dir, seed, sizes, dev, llm_report, alone,
                                                               workers))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    else:
        build_llm(corpus, llm_dir, seed, sizes, dev, llm_report)
        times["llm"] = time.time() - t_llm
    try:
        t = time.time()
        write_world(out, seed, sizes, 1 if llm_proc is not None else min(workers, 2), sents)
        times["world"] = time.time() - t

        t = time.time()
        enc, head = build_whisper(out / PATHS["whisper"], out, seed, sizes, 1 if workers > 1 else 0,
                                  llm_dir / "tokenizer.json")
        times["whisper"] = time.time() - t

        t = time.time()
        beats, predictor = build_beats(out / PATHS["beats"], out, corpus.en[:len(sents["llm_en"])], seed, sizes,
                                       1 if workers > 1 else 0, llm_dir / "tokenizer.json")
        times["beats"] = time.time() - t

        t = time.time()
        quality = {"whisper": eval_whisper(enc, head, out), "beats": eval_beats(beats, predictor, out)}
        times["evaluation"] = time.time() - t
        if llm_proc is not None:
            alone.set()                                     # the encoders are done: every core to the LLM
            llm_proc.join()
            torch.set_num_threads(threads)
            times["llm"] = time.time() - t_llm
            if llm_proc.exitcode != 0:
                raise RuntimeError(f"toy: pretraining the LLM (a child process) failed with exit code "
                                   f"{llm_proc.exitcode}; its error is printed above. {out} is left unfinished.")
    finally:
        if llm_proc is not None and llm_proc.is_alive():
            llm_proc.terminate()
    llm, tok = LLM.from_pretrained(llm_dir, dtype=torch.float32), load_tokenizer(llm_dir)
    t = time.time()
    quality["llm"] = {**eval_llm(llm, tok, sents["mt_test"]),
                      **eval_copy(llm, tok, [e for e, _ in sents["mt_test"]], corpus.words, seed)}
    times["evaluation"] += time.time() - t
    times = {k: round(v, 1) for k, v in times.items()}
    times["total"] = round(time.time() - t0, 1)
    models = {
        "llm": {"path": PATHS["llm"], "config": {"vocab_size": llm.config.vocab_size, **TOY_LLM},
                "parameters": _params(llm), **json.loads(llm_report.read_text()),
                "tokens_per_step": sizes.llm_rows * LLM_SEQ, "peak_lr": LLM_LR, **quality["llm"]},
        "whisper": {"path": PATHS["whisper"], "config": TOY_WHISPER, "n_frames": enc.config.n_frames,
                    "parameters": enc.num_parameters(), "steps": sizes.whisper_steps, "batch": sizes.whisper_batch,
                    "peak_lr": WHISPER_LR, **quality["whisper"]},
        "beats": {"path": PATHS["beats"], "config": TOY_BEATS, "parameters": beats.num_parameters(),
                  "steps": sizes.beats_steps, "batch": sizes.beats_batch, "peak_lr": BEATS_LR, **quality["beats"]},
    }
    command = f"python toy.py build --out {out} --seed {seed}" + (" --quick" if quick else "")
    (out / "base_models.json").write_text(json.dumps({"command": command, "torch_threads": torch.get_num_threads(),
                                                      "seconds": times, **models}, indent=2, ensure_ascii=False) + "\n")
    counts = {split: getattr(sizes, split) for split in SPLITS}
    info.write_text(json.dumps({**settings, "paths": PATHS, "n_frames": enc.config.n_frames, "counts": counts,
                                "seconds": times}, indent=2) + "\n")
    _report(out, models, times)
    return out


def _report(out: Path, models: dict, times: dict) -> None:
    m = models
    print(f"\ntoy world in {out} ({times['total']:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()
                                                                        if k != "total") + ")")
    checks = ", ".join(f"{c['copy_sentences']:.3f} at {c['step']}" for c in m["llm"]["copy_checks"])
    print(f"  LLM      {m['llm']['parameters'] / 1e6:.2f} M params, {m['llm']['steps']} steps ({m['llm']['peak_steps']} at "
          f"the peak learning rate; dev copy checks: {checks or 'none'}): text MT BLEU "
          f"{m['llm']['mt_bleu']:.1f} ({m['llm']['n']} held-out sentences, greedy, {m['llm']['signature']}); repeats "
          f"{m['llm']['copy_sentences']:.3f} of held-out sentences' tokens and {m['llm']['copy_random_words']:.3f} of "
          "random words' right (teacher-forced)")
    print(f"  Whisper  {m['whisper']['parameters'] / 1e6:.2f} M params, {m['whisper']['steps']} steps: CER "
          f"{m['whisper']['cer']:.1f}%, WER {m['whisper']['wer']:.1f}% ({m['whisper']['split']}, greedy CTC, no LM)")
    print(f"  BEATs    {m['beats']['parameters'] / 1e6:.2f} M params, {m['beats']['steps']} steps: "
          f"{m['beats']['exact_match']:.1f}% of clips with exactly the right sounds, "
          f"{m['beats']['label_accuracy']:.1f}% label accuracy ({m['beats']['split']})")
    print(f"  written: {out / 'base_models.json'}, {out / 'world.json'}")



# ----------------------------------------------------------------------------------------------------
# 8. The method on the toy world: `python train.py --backbone toy`
# ----------------------------------------------------------------------------------------------------
#
# The real scripts run unchanged (train.py, select_layers.py, evaluate.py, through their command lines);
# only the sizes and rates below are the toy's. What differs from the paper, and why:
#   - the Q-Former is 2 layers of width 128 (not BERT-base's 768); it and LoRA train without dropout (SALMONN's
#     0.1 slows a run of a few thousand steps); LoRA's rank and scale and Eq. (6)'s α are the paper's;
#   - its windows are 0.16 s (window=8, stride=8 Whisper frames: 37 speech tokens per 6-s clip), not the
#     paper's 0.34 s (17 frames: 17 tokens): with the toy's small Q-Former they read speech better.
#     Measured on seed 0's world (issue 12's notes; stage 1 of 2,500 steps, one thread): greedy WER 14.0%
#     against 19.4% with 0.34-s windows; a step costs about a quarter more;
#   - peak learning rate 1e-3 against the paper's 3e-5, 1,500 (stage 1) and 200 (stage 3) steps against tens
#     of thousands, batch 16 against 32: a 0.6 M-parameter LLM and minutes of CPU. Stage 1 needs its 1,500
#     at 1e-3: on seed 0's world, 1,200 steps with a cosine to 1e-4 read at WER 37.0% and 1,200 at 2e-3 at
#     35.1%, against 12.4% after 1,500 at 1e-3 (REPRODUCTION.md, how the toy got here);
#   - stage 1 holds its learning rate at 1e-3 after the warm-up (no cosine decay) and draws ASR four times as
#     often as captioning (asr_train.jsonl:4; ASR is 8 of every 9 draws);
#   - both stages keep each clip's frozen-encoder outputs from its first use on (train.py --cache-encoders;
#     each clip is encoded alone, see EncoderCache): a stage-1 step costs about half what it did without;
#   - what stage 1 reaches is bounded first by the Whisper encoder (600 pretraining steps at lr 3e-3 read at
#     CTC WER 35.8% and left stage 1 at 41.5%; 900 at 6e-3 read at 9.4%; today's 700 at 6e-3 read at 14.4%, and
#     stage 1 reads as well as on the 900-step encoder: asr_valid accuracy 0.945 against 0.942 on seed 0), then
#     by the LLM: stage 1 reads speech through the LLM's copying, and learns fast only on an LLM that copies a
#     source laid out as speech (LLM_MIX's stretched repeats, pretrain_llm's copy check). With those,
#     asr_valid accuracy is 0.941-0.945 at step 1,500 on seeds 0-2 (it was 0.911 and 0.630 on seeds 0 and 1 at
#     1,500 of an earlier 2,500 steps);
#   - no early stopping (--patience 0: every run trains its steps; the best validation checkpoint is used);
#   - decoding is greedy (the paper decodes with beam 4, about four times the work).

TOY_QFORMER = "hidden=128,n_head=4,ffn=512,hidden_dropout=0,attn_dropout=0,window=8,stride=8"
# each stage's flags; its steps at full size (STAGE_STEPS) and with --quick (QUICK_STEPS)
STAGE_FLAGS = {
    "pretrain": ["--global-batch", "16", "--micro-batch", "16", "--lr", "1e-3", "--min-lr", "1e-3",
                 "--warmup-lr", "1e-5", "--lora", "dropout=0", "--cache-encoders"],
    "joint": ["--global-batch", "16", "--micro-batch", "16", "--lr", "1e-3", "--min-lr", "1e-4",
              "--warmup-lr", "1e-5", "--cache-encoders"],
}
STAGE_STEPS = {"pretrain": dict(steps=1500, warmup=50, eval_every=500),
               "joint": dict(steps=200, warmup=20, eval_every=100)}
QUICK_STEPS = {"pretrain": dict(steps=40, warmup=4, eval_every=20), "joint": dict(steps=20, warmup=2, eval_every=10)}
SELECT_PAIRS = {"full": 200, "quick": 40}


def _start_script(argv: list[str], threads: int = 1, log: Path | None = None):
    """One of the project's scripts in a fresh Python with its own torch thread count, its output to `log`
    (default: this terminal). Returns the Popen."""
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if log is None:
        return subprocess.Popen([sys.executable, *argv], env=env, cwd=Path(__file__).resolve().parent)
    with open(log, "w") as f:                     # the child holds its own copy of the descriptor
        return subprocess.Popen([sys.executable, *argv], env=env, cwd=Path(__file__).resolve().parent,
                                stdout=f, stderr=subprocess.STDOUT)


def _run_script(argv: list[str], threads: int = 1) -> None:
    """Run one of the project's scripts to the end in this terminal; a failure stops the chain naming it."""
    _run_chains({argv[0]: [(f"`{' '.join(argv)}`", argv, None)]}, threads)


def _failed(label: str, code: int, log: Path | None) -> SystemExit:
    if log is None:                                  # it wrote to this terminal
        return SystemExit(f"toy: the {label} run failed (exit {code})")
    tail = Path(log).read_text(errors="replace")[-2000:]
    return SystemExit(f"toy: the {label} run failed (exit {code}); the end of {log}:\n{tail}")


def _run_chains(chains: dict, jobs: int) -> None:
    """Chains of scripts, name -> [(label, argv, log file or None for this terminal), ...], each script started
    when the one before it in its chain has finished; `jobs` chains side by side, in the order given, with one
    torch thread each (fewer chains than jobs share the threads out). A failure stops every chain and names
    the script, its exit code and the end of its log."""
    waiting = [list(steps) for steps in chains.values() if steps]
    threads = max(1, jobs // max(1, min(jobs, len(waiting))))
    running = []                                     # [Popen, label, log, the chain's remaining steps]
    try:
        while waiting or running:
            while waiting and len(running) < max(1, jobs):
                (label, argv, log), *rest = waiting.pop(0)
                running.append([_start_script(argv, threads, log), label, log, rest])
            time.sleep(0.05)
            for run in list(running):
                p, label, log, rest = run
                if p.poll() is None:
                    continue
                if p.returncode:
                    raise _failed(label, p.returncode, log)
                if rest:
                    (label, argv, log), *rest = rest
                    run[:] = [_start_script(argv, threads, log), label, log, rest]
                else:
                    running.remove(run)
    finally:
        for p, *_ in running:
            if p.poll() is None:
                p.terminate()
                p.wait()


# --workers of every script the toy runs (train.py, evaluate.py): they read their audio in their own process, as
# every core is already computing (stage 1 on both, stage 3's runs one each) and a loader process takes its time
# from them (a stage-1 step with every clip's encoder outputs cached: 0.174 s against 0.201 s with --workers 1,
# benchmarks/bench_toy_stage1.py; the same batches, so the same weights)
SCRIPT_WORKERS = "0"


def _train_argv(stage: str, world: Path, out: Path, quick: bool, seed: int, extra: list[str]) -> list[str]:
    steps = (QUICK_STEPS if quick else STAGE_STEPS)[stage]
    w = {k: str(world / v) for k, v in PATHS.items()}
    data = (["--train", w["asr_train"] + ":4", w["aac_train"], "--valid", w["asr_valid"], "--qformer", TOY_QFORMER]
            if stage == "pretrain" else ["--train", w["st_train"], "--valid", w["st_dev"]])
    return ["train.py", "--stage", stage, "--backbone", w["llm"], "--whisper", w["whisper"], "--beats", w["beats"],
            *data, "--out", str(out), *STAGE_FLAGS[stage], "--steps", str(steps["steps"]),
            "--warmup", str(steps["warmup"]), "--eval-every", str(steps["eval_every"]), "--patience", "0",
            "--workers", SCRIPT_WORKERS, "--dtype", "fp32", "--seed", str(seed), *extra,
            *(["--resume"] if (out / "args.json").is_file() else [])]     # an interrupted run continues


def _evaluate_argv(ckpt: Path, manifest: Path, task: str, out: Path, extra: list[str] = ()) -> list[str]:
    return ["evaluate.py", "--ckpt", str(ckpt), "--data", str(manifest), "--task", task, "--out", str(out),
            "--greedy", "--batch-size", "32", "--workers", SCRIPT_WORKERS, "--max-new-tokens", "64", *extra]


def _st_test_step(out: Path, world: Path, name: str, text_input: bool = False) -> tuple:
    """_run_chains' step: evaluate.py on st_test for the stage-3 run out/joint_NAME into out/eval/st_NAME,
    with the alignment degree at layers 0-1 (Figure 6), or with text_input into out/eval/mt_NAME, the
    transcript where the speech goes (zero-shot MT, Table 5)."""
    kind = "mt" if text_input else "st"
    return (f"{name} {'zero-shot MT ' if text_input else ''}evaluation",
            _evaluate_argv(out / f"joint_{name}" / "best", world / PATHS["st_test"], "st_en_zh",
                           out / "eval" / f"{kind}_{name}", ["--text-input"] if text_input else ["--align-layers", "0,1"]),
            out / "eval" / f"{kind}_{name}.log")


def _stage3_chains(out: Path, world: Path, init: Path, runs: dict, quick: bool, seed: int) -> dict:
    """Per stage-3 run (name -> train.py flags, from the stage-1 checkpoint `init`): train it in out/joint_NAME
    (log out/joint_NAME.log), then evaluate.py on st_test in out/eval/st_NAME (log beside it) with the
    alignment degree at layers 0-1 (Figure 6). Finished steps are left out. Returns _run_chains' chains."""
    chains = {}
    for name, flags in runs.items():
        steps = []
        if not (out / f"joint_{name}" / "summary.json").is_file():
            steps.append((f"{name} stage-3", _train_argv("joint", world, out / f"joint_{name}", quick, seed,
                                                         ["--init", str(init), *flags, "--no-progress"]),
                          out / f"joint_{name}.log"))
        if not (out / "eval" / f"st_{name}" / "metrics.json").is_file():
            steps.append(_st_test_step(out, world, name))
        chains[name] = steps
    (out / "eval").mkdir(parents=True, exist_ok=True)
    return chains


def _metrics(out: Path, names, kind: str = "st") -> dict:
    """name -> out/eval/{kind}_NAME/metrics.json"""
    return {name: json.loads((out / "eval" / f"{kind}_{name}" / "metrics.json").read_text()) for name in names}


def run_method(out: str | os.PathLike, seed: int = 0, quick: bool = False, world: str | os.PathLike | None = None,
               jobs: int = 2) -> dict:
    """Every stage of AI-STA on the toy world, each cached in `out` (a second call resumes where the first
    stopped): the world, stage 1, layer selection, stage 3 with AI-STA and with CE only, evaluation."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = Path(world) if world else out / "world"
    times, t0 = {}, time.time()
    print(f"[1/5] the toy world ({'quick' if quick else 'full'}, seed {seed}) in {world}", flush=True)
    import torch
    torch.set_num_threads(1)
    build(world, seed=seed, quick=quick)
    times["world"] = time.time() - t0

    t = time.time()
    s1 = out / "stage1"
    if not (s1 / "summary.json").is_file():
        print("[2/5] stage 1: ASR + captioning, cross-entropy (train.py --stage pretrain)", flush=True)
        _run_script(_train_argv("pretrain", world, s1, quick, seed, []), threads=jobs)
    times["stage1"] = time.time() - t

    t = time.time()
    layers = out / "layers"
    if not (layers / "layer_selection.json").is_file():     # first and with every thread: AI-STA waits for it
        print("[3/5] stage 2: layer selection (select_layers.py)", flush=True)
        _run_script(["select_layers.py", "--ckpt", str(s1 / "best"), "--data", str(world / PATHS["asr_test_clean"]),
                     "--out", str(layers), "--num-pairs", str(SELECT_PAIRS["quick" if quick else "full"]),
                     "--seed", str(seed)], threads=jobs)
    times["stage2"] = time.time() - t

    selection = json.loads((layers / "layer_selection.json").read_text())
    align_layers = selection["selected"] or [0]
    if not selection["selected"]:
        print(f"toy: stage 2 selected no layer (every MRR under {selection['threshold']}; chance is "
              f"{selection['chance_mrr']:.3f}): stage 1 has not learned to read speech. AI-STA runs at layer 0 "
              "alone (Table 3's layer-0 setting) so that the chain completes; its result is not the method's.",
              flush=True)

    t = time.time()
    runs = {"ai-sta": ["--align", "ot", "--layers", ",".join(map(str, align_layers))], "ce": ["--align", "none"]}
    chains = _stage3_chains(out, world, s1 / "best", runs, quick, seed)
    asr = out / "eval" / "stage1_asr"
    if not (asr / "metrics.json").is_file():      # the CE-only run is the shorter: stage 1's WER goes beside it
        chains["ce"].insert(-1 if chains["ce"] else 0, ("stage-1 ASR evaluation", _evaluate_argv(
            s1 / "best", world / PATHS["asr_test_clean"], "asr", asr), out / "eval" / "stage1_asr.log"))
    if any(chains.values()):
        print(f"[4/5] stage 3: speech translation with AI-STA and with CE only, side by side (train.py --stage joint), "
              f"then evaluate.py on st_test (BLEU) and on asr_test_clean (stage 1's WER); logs in {out}/joint_*.log "
              f"and {out}/eval/*.log", flush=True)
        _run_chains(chains, jobs)
    times["stage3"] = time.time() - t      # with every evaluation, run beside it

    print("[5/5] results", flush=True)
    metrics = _metrics(out, ["ce", "ai-sta"])
    asr = json.loads((asr / "metrics.json").read_text())
    result = {"seed": seed, "quick": quick, "world": str(world),
              "stage1_asr_wer": round(100 * asr["wer"], 2), "selected_layers": selection["selected"], "threshold": selection["threshold"], "layers": selection["layers"],
              "chance_mrr": selection["chance_mrr"], "ai_sta_layers": align_layers,
              "mrr": selection["mrr"],
              "bleu": {name: m["bleu"] for name, m in metrics.items()},
              "alignment_mean_log_w": {name: m["alignment"]["mean_log_w"] for name, m in metrics.items()},
              "figures": {"figure4": str(layers / "layer_selection.png"),
                          "loss_curves": [str(out / f"joint_{n}" / "loss_curves.png") for n in ("ce", "ai-sta")]},
              "seconds": {k: round(v, 1) for k, v in times.items()}}
    result["seconds"]["total"] = round(time.time() - t0, 1)
    if (out / "result.json").is_file():     # written last: every stage was done before this call; keep its times
        result["seconds"] = json.loads((out / "result.json").read_text())["seconds"]
    (out / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    _print_table(result, out)
    return result


# REPRODUCTION.md's stage-3 runs beyond Table 2's two, from the same stage-1 checkpoint (the toy LLM has 4
# layers, Qwen2-7B 28: the paper's "Layer 0-5" becomes 0-2)
CLAIM_RUNS = {
    "layer0": ["--align", "ot", "--layers", "0"],           # Table 3: the embeddings only
    "layers0-2": ["--align", "ot", "--layers", "0-2"],      # Table 3: a fixed deeper set
    "layer1": ["--align", "ot", "--layers", "1"],           # Table 3: without layer 0
    "ctc": ["--align", "ctc"],                              # Table 4: CTC at layer 0
    "contrastive": ["--align", "contrastive"],              # Table 4: contrastive (N-pair) at layer 0
    "layer0-a0.999": ["--align", "ot", "--layers", "0", "--alpha", "0.999"],   # a tenth of the paper's OT weight
}
# and AI-STA at the seed's selected layers (known only after stage 2) with half, a tenth and a twentieth of
# the paper's OT weight (1 - α = 0.01)
CLAIM_ALPHAS = ("0.995", "0.999", "0.9995")


def summarize_claims(per_seed: list[dict], figure6: dict) -> dict:
    """claims.json: each seed's figures, and per figure the mean and sample standard deviation over seeds."""
    def stats(get) -> dict:
        v = np.array([get(x) for x in per_seed], dtype=float)
        return {"mean": round(float(v.mean()), 3), "std": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 3),
                "values": [round(float(a), 3) for a in v]}

    runs = list(per_seed[0]["bleu"])
    return {"seeds": [x["seed"] for x in per_seed], "per_seed": per_seed, "figure6": figure6,
            "stage1_asr_wer": stats(lambda x: x["stage1_asr_wer"]),
            "mrr": [stats(lambda x, i=i: x["mrr"][i]) for i in range(len(per_seed[0]["mrr"]))],
            "selected_layers": [x["selected_layers"] for x in per_seed],
            "bleu": {n: stats(lambda x, n=n: x["bleu"][n]) for n in runs},
            "bleu_gain_ai_sta": stats(lambda x: x["bleu"]["ai-sta"] - x["bleu"]["ce"]),
            "mean_log_w": {n: stats(lambda x, n=n: x["mean_log_w"][n]) for n in runs},
            "mt_bleu": {n: stats(lambda x, n=n: x["mt_bleu"][n]) for n in per_seed[0]["mt_bleu"]},
            "modality_gap": {n: stats(lambda x, n=n: x["modality_gap"][n]) for n in per_seed[0]["modality_gap"]}}


def run_claims(out: str | os.PathLike, seeds: list[int], jobs: int = 2) -> dict:
    """The runs behind REPRODUCTION.md, per seed in out/seed{N} (cached, resumable): run_method, the
    CLAIM_RUNS, zero-shot MT of base and AI-STA (Table 5), Figure 5 (base vs AI-STA); then Figure 6 over every
    run of every seed, and out/claims.json with each figure per seed and its mean and standard deviation."""
    out = Path(out)
    per_seed = []
    for seed in seeds:
        d = out / f"seed{seed}"
        r = run_method(d, seed=seed, jobs=jobs)
        world = Path(r["world"])
        selected = ",".join(map(str, r["ai_sta_layers"]))
        runs = {**CLAIM_RUNS, **{f"ai-sta-a{a}": ["--align", "ot", "--layers", selected, "--alpha", a]
                                 for a in CLAIM_ALPHAS}}
        chains = _stage3_chains(d, world, d / "stage1" / "best", runs, False, seed)
        for name in ("ce", "ai-sta"):                 # Table 5: zero-shot MT, the transcript where the speech goes
            if not (d / "eval" / f"mt_{name}" / "metrics.json").is_file():
                chains[f"mt_{name}"] = [_st_test_step(d, world, name, text_input=True)]
        if any(chains.values()):
            print(f"claims, seed {seed}: {len(runs)} more stage-3 runs and their evaluations, {jobs} side by side "
                  f"(logs in {d}/joint_*.log and {d}/eval/*.log)", flush=True)
            _run_chains(chains, jobs)
        metrics = _metrics(d, ["ce", "ai-sta", *runs])
        mt = {name: m["bleu"] for name, m in _metrics(d, ["ce", "ai-sta"], "mt").items()}
        fig5 = d / "eval" / "figure5"
        if not (fig5 / "figure5.json").is_file():
            _run_script(["evaluate.py", "--figure5", "--data", str(world / PATHS["st_test"]), "--ckpt",
                         str(d / "joint_ce" / "best"), "--compare", str(d / "joint_ai-sta" / "best"), "--labels",
                         "base", "AI-STA", "--num-pairs", "300", "--seed", str(seed), "--out", str(fig5),
                         "--workers", SCRIPT_WORKERS], threads=jobs)
        gaps = {p["label"]: p["modality_gap"] for p in json.loads((fig5 / "figure5.json").read_text())["panels"]}
        per_seed.append({"seed": seed, "stage1_asr_wer": r["stage1_asr_wer"], "mrr": r["mrr"],
                         "selected_layers": r["selected_layers"], "bleu": {n: m["bleu"] for n, m in metrics.items()},
                         "mean_log_w": {n: m["alignment"]["mean_log_w"] for n, m in metrics.items()},
                         "mt_bleu": mt, "modality_gap": gaps, "minutes": round(r["seconds"]["total"] / 60, 1)})
    files = [out / f"seed{x['seed']}" / "eval" / f"st_{n}" / "metrics.json" for x in per_seed for n in x["bleu"]]
    labels = [f"{n}/{x['seed']}" for x in per_seed for n in x["bleu"]]
    _run_script(["evaluate.py", "--figure6", *map(str, files), "--labels", *labels, "--out", str(out / "figure6")])
    fig6 = json.loads((out / "figure6" / "figure6.json").read_text())

    summary = summarize_claims(per_seed, {k: v for k, v in fig6.items() if k != "points"})
    (out / "claims.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    pm = lambda st: f"{st['mean']:.2f} ± {st['std']:.2f}"
    print(f"\nclaims over seeds {seeds} ({out / 'claims.json'})")
    print("  stage-1 WER %: " + pm(summary["stage1_asr_wer"]))
    print("  MRR by layer: " + ", ".join(pm(m) for m in summary["mrr"]))
    for n, st in summary["bleu"].items():
        print(f"  BLEU {n:<12} {pm(st)}   mean ln W {pm(summary['mean_log_w'][n])}")
    print("  AI-STA - base BLEU: " + pm(summary["bleu_gain_ai_sta"]))
    print("  zero-shot MT BLEU: " + ", ".join(f"{n} {pm(st)}" for n, st in summary["mt_bleu"].items()))
    print(f"  Figure 6: Pearson r {fig6.get('pearson_r')}; {out / 'figure6' / 'figure6.png'}")
    return summary


def _print_table(r: dict, out: Path) -> None:
    print(f"\nAI-STA on the toy world (seed {r['seed']}{', quick' if r['quick'] else ''}; "
          f"{r['seconds']['total'] / 60:.1f} min)")
    print(f"  stage 1 ASR WER (asr_test_clean, greedy): {r['stage1_asr_wer']:.1f}%")
    print(f"  stage 2 selected layers (MRR > {r['threshold']}): {r['selected_layers']}   "
          "MRR by layer: " + " ".join(f"{m:.3f}" for m in r["mrr"]) + f" (chance {r['chance_mrr']:.3f})")
    print("\n  Table 2 (toy): speech translation En->Zh, st_test, greedy, sacrebleu zh")
    at = ",".join(map(str, r["ai_sta_layers"])) + ("" if r["selected_layers"] else "; none was selected")
    rows = [("Base (CE only)", r["bleu"]["ce"]), (f"AI-STA (OT at layers {at})", r["bleu"]["ai-sta"])]
    width = max(len(name) for name, _ in rows)
    print(f"  | {'model':<{width}} | BLEU  |\n  |{'-' * (width + 2)}|-------|")
    for name, bleu in rows:
        print(f"  | {name:<{width}} | {bleu:5.1f} |")
    print(f"\n  figures: {r['figures']['figure4']}, " + ", ".join(r["figures"]["loss_curves"]))
    print(f"  everything: {out / 'result.json'}")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="toy_run", help="where the world and every stage's output go (default toy_run; "
                   "a second call resumes: finished stages are kept)")
    p.add_argument("--seed", type=int, default=0, help="the world's and the training runs' seed")
    p.add_argument("--quick", action="store_true", help="a small world and short stages (about 3 minutes; CI)")
    p.add_argument("--world", help="use this world folder (default OUT/world; built there if missing)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes side by side for stage 3's two runs (default: 2 if the machine has 2 cores)")


def run_from_args(args, p: argparse.ArgumentParser) -> dict:
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    for flag, value in (("--out", args.out), ("--world", args.world)):
        if value and Path(value).exists() and not Path(value).is_dir():
            p.error(f"{flag} {value} exists and is not a folder")
    try:
        return run_method(args.out, seed=args.seed, quick=args.quick, world=args.world, jobs=args.jobs)
    except FileExistsError as e:
        p.error(str(e))


def train_main(argv: list[str]) -> dict:
    """`python train.py --backbone toy [--quick] [--seed N] [--out DIR]`: the whole method on the toy world."""
    p = argparse.ArgumentParser(prog="train.py --backbone toy",
                                description="AI-STA end to end on the toy world: build it (cached), stage 1, layer "
                                            "selection, stage 3 with AI-STA and CE only, evaluation.")
    p.add_argument("--backbone", choices=["toy"], required=True)
    add_run_arguments(p)
    return run_from_args(p.parse_args(argv), p)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="The toy world of AI-STA: build it (text, speech, sounds, "
                                "manifests, pretrained base models), or print a few sentence pairs.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the world into --out (cached: a second call returns at once)")
    b.add_argument("--out", required=True, help="the world's folder")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quick", action="store_true", help="a small world and short pretraining (for CI)")
    b.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1). With 2 or more cores the LLM and the encoders train side by "
                        "side on one thread each whatever this says (which makes the weights reproducible on a "
                        "machine); it sets the threads of the final evaluation, and of all training on one core")
    b.add_argument("--force", action="store_true", help="rebuild even if --out holds a world")
    r = sub.add_parser("run", help="every stage of AI-STA on the world (what `train.py --backbone toy` runs)")
    add_run_arguments(r)
    c = sub.add_parser("claims", help="the runs behind REPRODUCTION.md: the method, Tables 3-5 and Figures 5-6 "
                       "over several seeds (hours; resumable)")
    c.add_argument("--out", default="toy_claims", help="one folder per seed and claims.json (default toy_claims)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="stage-3 runs side by side")
    s = sub.add_parser("sample", help="print sentence pairs of the two languages")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-n", type=int, default=10)
    args = p.parse_args(argv)
    if args.cmd == "claims":
        if min(args.seeds) < 0 or args.jobs < 1 or len(set(args.seeds)) != len(args.seeds):
            p.error(f"--seeds must be distinct and >= 0 (got {args.seeds}), --jobs >= 1 (got {args.jobs})")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            p.error(f"--out {args.out} exists and is not a folder")
        run_claims(args.out, args.seeds, args.jobs)
        return
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if args.cmd == "sample":
        rng, wording = sentence_streams(args.seed)            # the world's first sentences, as drawn
        for _ in range(args.n):
            en, zh = sample_sentence(rng)
            zh = vary(zh, wording)
            print(f"{en}\n    {zh}")
        return
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    if args.cmd == "run":
        run_from_args(args, p)
        return
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    import torch
    torch.set_num_threads(args.threads)
    try:
        build(args.out, seed=args.seed, quick=args.quick, force=args.force)
    except FileExistsError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
