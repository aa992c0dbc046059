"""Chinese fairy tales and fables: the story function of the built-in grammar."""

from components.corpus.grammar import endings, options

# (how the opening introduces it, how the story names it later, pronoun)
KINDS = [
    ("一只小狐狸", "小狐狸", "它"), ("一位老国王", "老国王", "他"),
    ("一个小女孩", "小女孩", "她"), ("一位老渔夫", "老渔夫", "他"),
    ("一条小白龙", "小白龙", "它"), ("一个小裁缝", "小裁缝", "他"),
    ("一位小公主", "小公主", "她"), ("一个放牛娃", "放牛娃", "他"),
    ("一只小白兔", "小白兔", "它"), ("一位老婆婆", "老婆婆", "她"),
    ("一个年轻的樵夫", "樵夫", "他"), ("一只聪明的乌鸦", "乌鸦", "它"),
    ("一个小和尚", "小和尚", "他"), ("一位年轻的王子", "王子", "他"),
    ("一只小老鼠", "小老鼠", "它"), ("一头大黑熊", "大黑熊", "它"),
    ("一位织布的姑娘", "织布姑娘", "她"), ("一个老铁匠", "老铁匠", "他"),
    ("一只花猫", "花猫", "它"), ("一个勤劳的农夫", "农夫", "他"),
    ("一只小刺猬", "小刺猬", "它"), ("一位采药的姑娘", "采药姑娘", "她"),
    ("一只大公鸡", "大公鸡", "它"), ("一个牧羊的少年", "牧羊少年", "他"),
]
NAMES = {
    "他": ["阿福", "大山", "石头", "小虎", "长生", "满仓", "铁柱", "春生"],
    "她": ["小梅", "秀兰", "春花", "月儿", "巧云", "玉珍", "彩霞", "小翠"],
    "它": ["灰灰", "点点", "毛毛", "豆豆", "球球", "花花", "乐乐", "跳跳"],
}
# (setting, the home it is later called)
SETTINGS = [
    ("遥远的王国", "王国"), ("古老的城堡", "城堡"), ("大海边的小渔村", "渔村"), ("大森林的深处", "森林"),
    ("雪山脚下的小村庄", "村庄"), ("长江边的小镇", "小镇"), ("开满桃花的山谷", "山谷"), ("沙漠中的绿洲", "绿洲"),
    ("竹林旁的茅屋", "茅屋"), ("湖心的小岛", "小岛"), ("热闹的京城", "京城"), ("草原上的帐篷", "草原"),
]
TRAITS = ["心地善良，总是乐于助人", "聪明伶俐，什么事都难不倒{p}", "胆子很大，就是有点儿粗心", "性子温和，做事特别有耐心",
          "对什么都很好奇", "为人老实，干活从不偷懒", "个子虽小，志气却很大", "天天乐呵呵的，走到哪儿唱到哪儿"]
TIMES = ["有一年夏天，", "有一年冬天，", "有一天早上，", "有一天夜里，", "一个下雨的傍晚，", "过了几年，"]
# (the problem, what the hero decides to do, how it ends)
PROBLEMS = [
    ("村里的井突然干了，大家都没有水喝", "去山那边找一眼清泉", "找到了清泉，把泉水引回了家乡"),
    ("{p}的妈妈得了重病，大夫说只有月亮草能治好她", "去寻找传说中的月亮草", "采到了月亮草，妈妈的病很快就好了"),
    ("一阵怪风吹走了国王的金冠", "把金冠找回来", "找回了金冠，国王高兴极了"),
    ("山上的老树生了病，叶子一片片掉光了", "为老树找来神奇的露水", "用露水救活了老树，树上又长满了绿叶"),
    ("天上的星星一颗接一颗地熄灭了", "把星星重新点亮", "点亮了星星，夜空又变得闪闪发光"),
    ("邻居家的小羊走丢了", "帮邻居把小羊找回来", "找到了小羊，把它平平安安地送回了家"),
    ("一场大雪封住了所有的路，{h}里快没有粮食了", "翻过雪山去借粮食", "借来了粮食，乡亲们都熬过了寒冬"),
    ("一个巫婆把{h}里的孩子们变成了石头", "去破解巫婆的咒语", "破解了咒语，孩子们都变回了原来的样子"),
    ("河里的鱼一夜之间全都不见了", "去东海问一问龙王", "请来了龙王帮忙，河里又游满了鱼"),
    ("一只受伤的小鸟落在{p}的门前", "送小鸟回到它的家", "把小鸟送回了家，鸟妈妈高兴地唱起了歌"),
]
PROVISIONS = ["一袋干粮", "一壶清水", "一把雨伞", "一根木棍", "一件旧棉袄", "一盏小灯笼"]
DURATIONS = ["三天三夜", "整整七天", "好几个月", "一天一夜", "九九八十一天", "很远很远的路"]
# (where, what makes it hard, how the magic object solves it)
OBSTACLES = [
    ("一条大河边", "河水又宽又急，{p}怎么也过不去", "河面上出现了一座彩虹桥，{n}稳稳地走了过去"),
    ("一片黑森林前", "林子里黑得伸手不见五指", "林子里一下子亮了起来，{n}找到了出路"),
    ("一座高高的悬崖下", "崖壁像刀削的一样，根本爬不上去", "崖壁上长出了一级级石阶，{n}一步一步爬了上去"),
    ("一个大沼泽旁", "沼泽里的泥又软又深，一脚踩下去就拔不出来", "沼泽上铺满了荷叶，{n}踩着荷叶走了过去"),
    ("一座冰山前", "寒风呼呼地吹，冻得{p}直发抖", "冰山慢慢融化了，露出了一条小路"),
    ("一个山洞口", "洞口有一条大蟒蛇守着，不让任何人通过", "大蟒蛇睡着了，{n}悄悄地走了过去"),
    ("一片大沙漠边", "沙漠里没有一滴水，太阳火辣辣地晒着", "天上下起了小雨，{n}顺利地穿过了沙漠"),
    ("一座迷宫门口", "迷宫里的路弯弯曲曲，走进去就出不来", "一只萤火虫飞来引路，{n}很快走出了迷宫"),
]
HELPERS = [
    ("一只白胡子老乌龟", "老乌龟"), ("一只会说话的猫头鹰", "猫头鹰"), ("一位穿白衣的仙女", "仙女"),
    ("一棵会说话的老槐树", "老槐树"), ("一个拄着拐杖的老爷爷", "老爷爷"), ("一只金色的小蜜蜂", "小蜜蜂"),
    ("一条银色的小鱼", "小银鱼"), ("一位山神", "山神"),
]
# (what the helper asks, what the hero does)
REQUESTS = [
    ("我的孩子病了，你能帮我找些草药吗？", "{n}跑遍了山坡，采来了一大把草药。"),
    ("我的房子被风吹坏了，你能帮我修一修吗？", "{n}搬来木头和石块，帮{x}把房子修好了。"),
    ("我很孤单，你愿意陪我说说话吗？", "{n}坐了下来，陪{x}聊了整整一个晚上。"),
    ("只要你答对我的谜语，我就帮你。", "{n}想了想，很快就说出了谜底。"),
    ("我的钥匙掉进井里了，你能帮我捞上来吗？", "{n}用绳子绑住水桶，把钥匙捞了上来。"),
    ("我口渴了，你能给我一口水吗？", "{n}把自己仅有的水都给了{x}。"),
]
# (the gift, how it is used)
OBJECTS = [
    ("一支玉笛", "吹响了玉笛"), ("一面魔镜", "举起了魔镜"), ("一把金钥匙", "转动了金钥匙"), ("一颗夜明珠", "捧出了夜明珠"),
    ("一根羽毛", "挥了挥羽毛"), ("一个小葫芦", "打开了小葫芦"), ("一条红丝带", "解下了红丝带"), ("一粒神奇的种子", "种下了神奇的种子"),
]
FAREWELLS = ["遇到困难的时候，它会帮助你。", "记住，只有心地善良的人才能用它。", "用完以后，别忘了把它还给大自然。",
             "它只能用一次，要用在最需要的时候。"]
ENDINGS = ["大家都围着{p}欢呼。", "从此过上了幸福的生活。", "把这段经历讲给了所有的孩子听。", "每年都去看望{x}。",
           "再也没有人小看{p}了。"]
# A fable ends with its moral, a fairy tale with a closing formula.
MORAL_INTROS = ["这个故事告诉我们，", "人们常说，"]
CLOSINGS = ["故事就讲到这里。", "直到今天，人们还在传说这件事。", "这就是{n}的故事。"]
MORALS = ["只要坚持，就没有克服不了的困难", "帮助别人，也是在帮助自己", "善良的人总会得到好报", "遇到困难要多动脑筋",
          "朋友的力量是无穷的", "勇敢的心比宝物更珍贵", "做事不能半途而废", "大自然的馈赠要好好珍惜"]


def story(d):
    """One story: the opening sentence is the prompt, the rest the continuation."""
    opening = d.choose("opening", options("从前有座山，山里有座庙，庙里住着", "很久很久以前，在", "从前，在"))
    if opening.startswith("从前有座山"):
        home = "山上的庙"
    else:
        home = d.choose("setting", options(*[(s, h) for s, h in SETTINGS]))
        d.say("，住着")
    kind, short, p = d.choose("kind", options(*[(k[0], k) for k in KINDS]))
    d.say("，名叫")
    n = d.choose("name", options(*NAMES[p]))
    d.say("。")
    d.prompt_ends_here()

    d.say(n)
    d.choose("trait", options(*[t.format(p=p) for t in TRAITS]))
    d.say("。")
    d.choose("time", options(*TIMES))
    problem, action, resolution = d.choose("problem", options(*[(q.format(p=p, h=home), (q, a, r)) for q, a, r in PROBLEMS]))
    d.say(f"。{n}决定{action}。{p}带上")
    d.choose("provision", options(*PROVISIONS))
    d.say("，走了")
    d.choose("duration", options(*DURATIONS))
    d.say("，来到了")
    hard, solution = d.choose("obstacle", options(*[(o[0], o[1:]) for o in OBSTACLES]))
    d.say(f"。{hard.format(p=p)}。这时，")
    x = d.choose("helper", options(*[(h, s) for h, s in HELPERS]))
    d.say(f"出现了。{x}说：“")
    deed = d.choose("request", options(*[(r, deed) for r, deed in REQUESTS]))
    d.say("”" + deed.format(n=n, x=x) + f"{x}很高兴，送给{n}")
    use = d.choose("object", options(*[(o, u) for o, u in OBJECTS]))
    d.say("，说：“")
    d.choose("farewell", options(*FAREWELLS))
    d.say(f"”{n}{use}，{solution.format(n=n)}。最后，{n}终于{resolution}。{p}回到了{home}，")
    d.choose("ending", options(*[e.format(p=p, x=x) for e in ENDINGS]))
    genre = d.choose("close", endings({"fable": MORAL_INTROS, "fairy_tale": [c.format(n=n) for c in CLOSINGS]}))
    if genre == "fable":
        d.choose("moral", options(*MORALS))
        d.say("。")
    return [genre]
