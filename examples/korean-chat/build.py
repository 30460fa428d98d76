"""Build the Korean chat set: `python examples/korean-chat/build.py` rewrites train.jsonl and heldout.jsonl.

The set is written for llamaherd (CC0, see LICENSE): hand-written conversations (handwritten.jsonl,
handwritten-heldout.jsonl) plus short question-and-answer pairs made from the small fact tables below,
always in the same polite style (합니다체), so that a 135M model can learn the style in a few minutes.
Held-out rows use the same question forms with facts the training rows never show, so the held-out
loss measures the style and the language learned, not memorised answers. Deterministic (seeded).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "당신은 친절하고 간결하게 한국어로 답하는 도우미입니다."

CAPITALS = [("프랑스", "파리"), ("일본", "도쿄"), ("중국", "베이징"), ("영국", "런던"), ("독일", "베를린"),
            ("이탈리아", "로마"), ("스페인", "마드리드"), ("러시아", "모스크바"), ("캐나다", "오타와"),
            ("미국", "워싱턴 D.C."), ("호주", "캔버라"), ("이집트", "카이로"), ("태국", "방콕"),
            ("베트남", "하노이"), ("인도", "뉴델리"), ("브라질", "브라질리아"), ("멕시코", "멕시코시티"),
            ("그리스", "아테네"), ("포르투갈", "리스본"), ("네덜란드", "암스테르담"), ("스웨덴", "스톡홀름"),
            ("노르웨이", "오슬로"), ("핀란드", "헬싱키"), ("덴마크", "코펜하겐"), ("폴란드", "바르샤바"),
            ("오스트리아", "빈"), ("튀르키예", "앙카라"), ("아르헨티나", "부에노스아이레스"),
            ("페루", "리마"), ("케냐", "나이로비"), ("필리핀", "마닐라"), ("몽골", "울란바토르")]
WORDS = [("사과", "apple"), ("물", "water"), ("책", "book"), ("학교", "school"), ("고양이", "cat"),
         ("강아지", "puppy"), ("하늘", "sky"), ("바다", "sea"), ("친구", "friend"), ("집", "house"),
         ("꽃", "flower"), ("나무", "tree"), ("의자", "chair"), ("창문", "window"), ("우유", "milk"),
         ("빵", "bread"), ("달", "moon"), ("별", "star"), ("비", "rain"), ("눈", "snow"), ("자동차", "car"),
         ("기차", "train"), ("시계", "clock"), ("연필", "pencil"), ("가방", "bag"), ("신발", "shoes"),
         ("어머니", "mother"), ("아버지", "father"), ("선생님", "teacher"), ("음악", "music"),
         ("바람", "wind"), ("산", "mountain"), ("강", "river"), ("손", "hand"), ("머리", "head"),
         ("아침", "morning"), ("저녁", "evening"), ("여름", "summer"), ("겨울", "winter"), ("커피", "coffee")]
COLOURS = [("바나나", "노란색"), ("딸기", "빨간색"), ("하늘", "파란색"), ("잔디", "초록색"), ("눈", "하얀색"),
           ("숯", "검은색"), ("당근", "주황색"), ("포도", "보라색"), ("레몬", "노란색"), ("토마토", "빨간색"),
           ("오이", "초록색"), ("우유", "하얀색"), ("까마귀", "검은색"), ("귤", "주황색"), ("가지", "보라색"),
           ("병아리", "노란색"), ("소방차", "빨간색"), ("바다", "파란색"), ("개구리", "초록색"), ("구름", "하얀색")]
SOUNDS = [("강아지", "멍멍"), ("고양이", "야옹"), ("소", "음매"), ("돼지", "꿀꿀"), ("닭", "꼬끼오"),
          ("오리", "꽥꽥"), ("병아리", "삐약삐약"), ("개구리", "개굴개굴"), ("양", "매에"), ("참새", "짹짹"),
          ("부엉이", "부엉부엉"), ("염소", "음메")]
OPPOSITES = [("크다", "작다"), ("길다", "짧다"), ("덥다", "춥다"), ("높다", "낮다"), ("많다", "적다"),
             ("빠르다", "느리다"), ("밝다", "어둡다"), ("무겁다", "가볍다"), ("넓다", "좁다"), ("쉽다", "어렵다"),
             ("좋다", "나쁘다"), ("가깝다", "멀다"), ("깨끗하다", "더럽다"), ("두껍다", "얇다"), ("젊다", "늙다"),
             ("뜨겁다", "차갑다"), ("기쁘다", "슬프다"), ("강하다", "약하다"), ("싸다", "비싸다"), ("열다", "닫다")]
LEGS = [("사람", "두"), ("닭", "두"), ("오리", "두"), ("강아지", "네"), ("고양이", "네"), ("소", "네"),
        ("말", "네"), ("코끼리", "네"), ("개미", "여섯"), ("나비", "여섯"), ("벌", "여섯"), ("거미", "여덟"),
        ("문어", "여덟"), ("토끼", "네"), ("펭귄", "두"), ("사자", "네")]
DAYS = ["월요일", "화요일", "수요일", "목요일", "금요일", "토요일", "일요일"]
SEASONS = [("봄", "3월부터 5월까지"), ("여름", "6월부터 8월까지"), ("가을", "9월부터 11월까지"),
           ("겨울", "12월부터 2월까지")]
NUMBERS = ["영", "일", "이", "삼", "사", "오", "육", "칠", "팔", "구", "십"]


def batchim(word: str) -> bool:
    """Whether the word's last syllable ends in a consonant (it picks the particle: 은/는, 을/를, 이라/라)."""
    ch = word.rstrip("'")[-1]
    return "가" <= ch <= "힣" and (ord(ch) - ord("가")) % 28 != 0


def reading(n: int) -> str:
    """The Sino-Korean reading of a number's last unit (10 and 20 end in 십), for its particle."""
    return NUMBERS[n % 10] if n % 10 else "십"


def topic(word: str, said: str | None = None) -> str:
    return word + ("은" if batchim(said or word) else "는")


def obj(word: str, said: str | None = None) -> str:
    return word + ("을" if batchim(said or word) else "를")


def capital(c):
    return f"{c[0]}의 수도는 어디인가요?", f"{c[0]}의 수도는 {c[1]}입니다."


def english(w):
    word = topic(f"'{w[0]}'")
    return f"{word} 영어로 무엇인가요?", f"{word} 영어로 {w[1]}입니다."


def colour(c):
    return f"{topic(c[0])} 무슨 색인가요?", f"{topic(c[0])} 보통 {c[1]}입니다."


def sound(s):
    return f"{topic(s[0])} 어떻게 울어요?", f"{topic(s[0])} '{s[1]}' 하고 웁니다."


def opposite(o):
    return f"'{o[0]}'의 반대말은 무엇인가요?", f"'{o[0]}'의 반대말은 '{o[1]}'입니다."


def legs(animal):
    return f"{topic(animal[0])} 다리가 몇 개인가요?", f"{topic(animal[0])} 다리가 {animal[1]} 개입니다."


def day_after(i):
    return f"{DAYS[i]} 다음은 무슨 요일인가요?", f"{DAYS[i]} 다음은 {DAYS[(i + 1) % 7]}입니다."


def season(s):
    return f"한국에서 {s[0]}은 몇 월인가요?", f"한국에서 {s[0]}은 보통 {s[1]}입니다."


def addition(pair):
    a, b = pair
    said = f"{a} 더하기 {topic(str(b), reading(b))}"
    return f"{said} 얼마인가요?", f"{said} {a + b}입니다."


def sino(n):
    quote = "이라고" if batchim(NUMBERS[n]) else "라고"
    return (f"숫자 {obj(str(n), reading(n))} 한자어로 어떻게 읽나요?",
            f"숫자 {topic(str(n), reading(n))} 한자어로 '{NUMBERS[n]}'{quote} 읽습니다.")


def split(items, every):
    """Every `every`-th item is held out; the rest train."""
    return ([x for i, x in enumerate(items) if i % every != every - 1],
            [x for i, x in enumerate(items) if i % every == every - 1])


def make_pairs(rng):
    """(question, answer) pairs for training and for held-out, by table."""
    sums = sorted({(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(60)})
    tables = [(capital, CAPITALS, 4), (english, WORDS, 5), (colour, COLOURS, 5), (sound, SOUNDS, 4),
              (opposite, OPPOSITES, 5), (legs, LEGS, 4), (day_after, list(range(7)), 7), (season, SEASONS, 4),
              (addition, sums, 5), (sino, list(range(1, 11)), 5)]
    train, heldout = [], []
    for make, items, every in tables:
        seen, held = split(items, every)
        train += [make(x) for x in seen]
        heldout += [make(x) for x in held]
    return train, heldout


def conversation(pairs, rng):
    """One or two exchanges, with the system prompt half of the time."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    for q, a in pairs:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def conversations(pairs, rng):
    """Shuffle the pairs; about one in five conversations has two turns."""
    pairs = pairs[:]
    rng.shuffle(pairs)
    rows, i = [], 0
    while i < len(pairs):
        n = 2 if rng.random() < 0.2 and i + 1 < len(pairs) else 1
        rows.append(conversation(pairs[i:i + n], rng))
        i += n
    return rows


GREETINGS = [("안녕하세요!", "안녕하세요! 무엇을 도와드릴까요?"),
             ("고마워요.", "천만에요. 더 궁금한 것이 있으면 말씀해 주세요."),
             ("감사합니다.", "별말씀을요. 언제든지 물어보세요."),
             ("잘 자요.", "안녕히 주무세요. 좋은 꿈 꾸세요."),
             ("좋은 아침이에요.", "좋은 아침입니다! 오늘도 좋은 하루 보내세요."),
             ("이름이 뭐예요?", "저는 한국어로 답하는 도우미입니다."),
             ("한국어 할 줄 아세요?", "네, 한국어로 대화할 수 있습니다."),
             ("오늘 피곤해요.", "많이 피곤하시군요. 따뜻한 차를 마시고 푹 쉬세요."),
             ("배고파요.", "배가 고프시군요. 간단하게 밥이나 빵을 드셔 보세요."),
             ("심심해요.", "산책을 하거나 좋아하는 음악을 들어 보세요."),
             ("다음에 또 봐요.", "네, 다음에 또 뵙겠습니다. 안녕히 가세요."),
             ("도와줘서 고마워요.", "도움이 되어 기쁩니다.")]
GREETINGS_HELDOUT = [("반가워요.", "저도 반갑습니다! 무엇을 도와드릴까요?"),
                     ("수고하셨습니다.", "감사합니다. 편히 쉬세요."),
                     ("목이 말라요.", "시원한 물을 한 잔 드셔 보세요.")]


def read(name):
    return [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def write(name, rows):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (HERE / name).write_text(text, encoding="utf-8")


def main():
    rng = random.Random(0)
    train, heldout = make_pairs(rng)
    train_rows = read("handwritten.jsonl") + conversations(train + GREETINGS, rng)
    heldout_rows = read("handwritten-heldout.jsonl") + conversations(heldout + GREETINGS_HELDOUT, rng)
    write("train.jsonl", train_rows)
    write("heldout.jsonl", heldout_rows)
    print(f"train.jsonl: {len(train_rows)} conversations; heldout.jsonl: {len(heldout_rows)}")


if __name__ == "__main__":
    main()
