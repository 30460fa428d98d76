"""The code shield's own rules: fast regular expressions for the common insecure patterns.

Each rule names the CWE it finds, a severity and the languages it applies to:

    block   directly exploitable as written (injection of input, TLS verification off, unsafe
            deserialisation, `gets`, live credentials): a server in HERD_CODE_SHIELD=block mode
            removes the code
    warn    insecure practice that needs a look (weak hashes and ciphers, `strcpy`, hard-coded
            passwords, world-writable files, temporary-file races)
    advice  worth knowing, rarely a bug (non-cryptographic randomness, debug mode)

A regex sees one line at a time (a match's line is reported), so rules look for the dangerous
call *with* the sign of non-constant input on the same line (an f-string, concatenation, `$_GET`,
`%s` formatting...). That keeps precision high; what needs data flow is Bandit's and Semgrep's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    id: str
    cwe: str
    severity: str  # block | warn | advice
    languages: frozenset[str]  # empty: every language
    pattern: re.Pattern
    message: str


def _langs(spec: str) -> frozenset[str]:
    return frozenset(spec.split()) if spec != "*" else frozenset()


# Non-constant text on a line: an f-string, concatenation with a name, %/format, template literals,
# PHP/shell/Ruby interpolation.
DYN = r"""(?:\bf["']|["'`]\s*(?:\+|\.|%)\s*[\w$(]|[\w)\]]\s*\+\s*["'`]|\.format\(|\$\{|\$[A-Za-z_]|#\{|`)"""
SQL = r"""(?:SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|DROP\s+TABLE)"""

_RULES: list[tuple[str, str, str, str, str, str]] = [
    # id, CWE, severity, languages, pattern, message
    # -- weak hashes and ciphers
    ("weak-hash", "CWE-328", "warn", "python", r"\bhashlib\.(?:md5|sha1)\s*\((?![^)]*usedforsecurity\s*=\s*False)|\bhashlib\.new\(\s*['\"](?:md5|sha1)['\"]",
     "MD5/SHA-1 are broken for security: use hashlib.sha256, or usedforsecurity=False for checksums"),
    ("weak-hash", "CWE-328", "warn", "javascript", r"createHash\(\s*['\"](?:md5|sha1)['\"]", "MD5/SHA-1 are broken: use sha256"),
    ("weak-hash", "CWE-328", "warn", "java kotlin", r"MessageDigest\.getInstance\(\s*\"(?:MD5|MD2|SHA-?1)\"", "MD5/SHA-1 are broken: use SHA-256"),
    ("weak-hash", "CWE-328", "warn", "php", r"\b(?:md5|sha1)\s*\(\s*\$", "md5()/sha1() are broken for passwords and signatures: use password_hash or hash('sha256')"),
    ("weak-hash", "CWE-328", "warn", "go", r"\b(?:md5|sha1)\.(?:New|Sum)\s*\(", "MD5/SHA-1 are broken: use crypto/sha256"),
    ("weak-hash", "CWE-328", "warn", "c cpp", r"\b(?:MD5|SHA1|MD4)(?:_Init|_Update|_Final)?\s*\(|\bEVP_(?:md5|sha1)\s*\(", "MD5/SHA-1 are broken: use SHA-256"),
    ("weak-hash", "CWE-328", "warn", "ruby", r"Digest::(?:MD5|SHA1)\b", "MD5/SHA-1 are broken: use Digest::SHA256"),
    ("weak-hash", "CWE-328", "warn", "csharp", r"\b(?:MD5|SHA1)\.Create\(|new\s+(?:MD5|SHA1)CryptoServiceProvider", "MD5/SHA-1 are broken: use SHA256"),
    ("weak-hash", "CWE-328", "warn", "rust", r"\bmd5::compute\(|\b(?:Md5|Sha1)::new\(", "MD5/SHA-1 are broken: use sha2"),
    ("weak-cipher", "CWE-327", "warn", "*", r"""\bDES(?:ede)?\.new\(|Cipher\.getInstance\(\s*"(?:DES|RC4|AES/ECB|AES")|\bMODE_ECB\b|createCipheriv?\(\s*['"](?:des|rc4|aes-\d+-ecb)|\bEVP_(?:des|rc4)_|\bARC4\.new\(""",
     "DES/RC4/ECB mode are broken: use AES-GCM or ChaCha20-Poly1305"),
    # -- code injection
    ("eval-input", "CWE-95", "block", "python", r"\b(?:eval|exec)\s*\(\s*(?:input\(|request\.|sys\.argv|os\.environ|f[\"'])",
     "eval/exec of user input runs arbitrary code: parse the input instead (ast.literal_eval, json)"),
    ("eval-dynamic", "CWE-95", "warn", "python", r"(?<![\w.])(?:eval|exec)\s*\(\s*(?![\"'\s)]|input\(|request\.|sys\.argv|os\.environ|f[\"'])",
     "eval/exec of a non-constant string runs whatever it holds"),
    ("eval-input", "CWE-95", "block", "javascript", r"(?<![\w.])eval\s*\(\s*(?:req\.|request\.|location|document\.|process\.argv|`|[\w$]+\s*\+)",
     "eval of user input runs arbitrary code: use JSON.parse"),
    ("eval-dynamic", "CWE-95", "warn", "javascript", r"(?<![\w.])eval\s*\(\s*[A-Za-z_$][\w$]*\s*\)|\bnew\s+Function\s*\(",
     "eval/new Function of a non-constant string runs whatever it holds"),
    ("eval-input", "CWE-95", "block", "php", r"\b(?:eval|assert)\s*\(\s*\$|\bpreg_replace\s*\(\s*['\"]/.*/[a-z]*e[a-z]*['\"]", "eval of a variable runs arbitrary PHP"),
    ("eval-input", "CWE-95", "block", "ruby", r"\b(?:eval|instance_eval|class_eval)\s*\(?\s*(?:params|request|ARGV|gets)", "eval of user input runs arbitrary Ruby"),
    ("template-injection", "CWE-1336", "block", "python", r"render_template_string\s*\(\s*(?:request\.|f[\"']|[\w]+\s*\+)",
     "rendering a template built from input is server-side template injection"),
    # -- OS command injection
    ("shell-injection", "CWE-78", "block", "python", r"\bos\.(?:system|popen)\s*\(\s*(?![\"'][^\"']*[\"']\s*\))" ,
     "os.system/os.popen with a non-constant command: use subprocess.run([...]) with a list"),
    ("shell-injection", "CWE-78", "block", "python", r"\bsubprocess\.\w+\(.*shell\s*=\s*True", "shell=True runs the command through /bin/sh: pass a list and drop shell=True"),
    ("shell-injection", "CWE-78", "block", "python", r"\bcommands\.getoutput\(|\bos\.exec[lv]p?e?\(\s*[\"']/bin/(?:ba)?sh[\"']", "running a shell with a built command string"),
    ("shell-injection", "CWE-78", "block", "javascript", r"\b(?:exec|execSync)\s*\(\s*(?:`[^`]*\$\{|['\"][^'\"]*['\"]\s*\+|[A-Za-z_$][\w$]*\s*[,)+])",
     "child_process.exec runs a shell: use execFile/spawn with an argument array"),
    ("shell-injection", "CWE-78", "block", "java kotlin", r"Runtime\.getRuntime\(\)\.exec\(\s*(?:\"[^\"]*\"\s*\+|[a-z]\w*\s*\))|new\s+ProcessBuilder\(\s*\"(?:sh|bash|cmd)\"\s*,\s*\"(?:-c|/c)\"",
     "Runtime.exec with a built string: pass an argument array to ProcessBuilder"),
    ("shell-injection", "CWE-78", "block", "php", r"\b(?:system|exec|shell_exec|passthru|popen|proc_open)\s*\([^)]*\$|`[^`]*\$[A-Za-z_]", "a shell command built from a variable: use escapeshellarg or avoid the shell"),
    ("shell-injection", "CWE-78", "block", "c cpp", r"\b(?:system|popen)\s*\(\s*(?!\")", "system/popen with a non-constant command runs a shell on it: use execve with arguments"),
    ("shell-injection", "CWE-78", "warn", "go", r"exec\.Command(?:Context)?\([^)]*\"(?:sh|bash)\"\s*,\s*\"-c\"", "exec.Command(\"sh\", \"-c\", ...) runs a shell: pass the program and its arguments"),
    ("shell-injection", "CWE-78", "warn", "rust", r"Command::new\(\s*\"(?:sh|bash)\"\s*\)\s*\.arg\(\s*\"-c\"", "sh -c runs a shell on the string: pass the program and its arguments"),
    ("shell-injection", "CWE-78", "block", "ruby", r"\b(?:system|exec|spawn|%x)\s*\(?\s*[\"'][^\"']*#\{|`[^`]*#\{", "a shell command with interpolated input: pass arguments separately"),
    ("shell-injection", "CWE-78", "block", "shell", r"\beval\s+[\"']?\$", "eval of a variable runs whatever it holds"),
    ("download-exec", "CWE-494", "warn", "shell", r"\b(?:curl|wget)\b[^|]*\|\s*(?:sudo\s+)?(?:ba|z)?sh\b", "piping a download into a shell runs unverified code"),
    # -- SQL injection
    ("sql-injection", "CWE-89", "block", "*", rf"""(?i)(?:"\s*{SQL}[^"]*"|'\s*{SQL}[^']*'|`\s*{SQL}[^`]*`)\s*(?:\+|%\s*[(\w]|\.\s*\$|\.format\()""",
     "SQL built by concatenation or formatting: use a parameterised query"),
    ("sql-injection", "CWE-89", "block", "*", rf"""(?i)(?:\bf|\$)(?:"\s*{SQL}[^"]*\{{|'\s*{SQL}[^']*\{{)|`\s*{SQL}[^`]*\$\{{|"\s*{SQL}[^"]*(?:#\{{|\$[A-Za-z_])""",
     "SQL with interpolated values: use a parameterised query"),
    ("sql-injection", "CWE-89", "block", "go", rf"""(?i)fmt\.Sprintf\(\s*"\s*{SQL}[^"]*%[sdv]""", "SQL built with Sprintf: use placeholders ($1, ?)"),
    ("sql-injection", "CWE-89", "block", "*", r"""(?i)\b(?:execute|executeQuery|executeUpdate|query|raw|exec)\s*\(\s*[a-z_]\w*\s*\+\s*|\b(?:execute|query)\s*\(\s*["'][^"']*["']\s*%\s*\w""",
     "a query built by concatenation: use a parameterised query"),
    # -- secrets
    ("hardcoded-secret", "CWE-798", "warn", "*",
     r"""(?i)\b[\w$]*(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|auth[_-]?token|private[_-]?key)\b["']?\s*(?::=|=>|[:=])\s*["'](?!\s*["'])(?![^"']*(?:\{\{|\$\{|<|\*\*\*|\byour[_ -]|\bchange[_ -]?me\b|example|placeholder|xxx))[^"'\s]{6,}["']""",
     "a credential in the source: read it from the environment or a secret store"),
    ("cloud-credential", "CWE-798", "block", "*", r"\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{36}\b|\bxox[baprs]-[A-Za-z0-9-]{10,}|\bsk-(?:proj-)?[A-Za-z0-9]{32,}|\bAIza[0-9A-Za-z_-]{35}\b",
     "a live-looking cloud/API credential: revoke it and load it from the environment"),
    ("private-key", "CWE-798", "block", "*", r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----", "a private key in the source"),
    # -- deserialisation
    ("unsafe-deserialization", "CWE-502", "block", "python", r"\b(?:c?[Pp]ickle|dill|_pickle|marshal|jsonpickle)\.(?:loads?|decode|Unpickler)\s*\(|\bshelve\.open\(",
     "unpickling runs code from the data: use JSON, or sign the data"),
    ("unsafe-deserialization", "CWE-502", "block", "python", r"\byaml\.(?:load|load_all|unsafe_load|full_load)\s*\((?![^)]*Loader\s*=\s*(?:yaml\.)?(?:Safe|Base)Loader)",
     "yaml.load without SafeLoader can build arbitrary objects: use yaml.safe_load"),
    ("unsafe-deserialization", "CWE-502", "warn", "python", r"\btorch\.load\s*\((?![^)]*weights_only\s*=\s*True)", "torch.load unpickles: pass weights_only=True"),
    ("unsafe-deserialization", "CWE-502", "block", "java kotlin", r"new\s+ObjectInputStream\s*\(|\bnew\s+XMLDecoder\s*\(|\benableDefaultTyping\s*\(", "Java deserialisation of untrusted data runs gadget chains"),
    ("unsafe-deserialization", "CWE-502", "block", "php", r"\bunserialize\s*\(\s*\$_(?:GET|POST|REQUEST|COOKIE)|\bunserialize\s*\(\s*(?:base64_decode|file_get_contents)\(", "unserialize of input instantiates arbitrary objects: use json_decode"),
    ("unsafe-deserialization", "CWE-502", "block", "ruby", r"\bMarshal\.load\s*\(|\bYAML\.(?:load|unsafe_load)\s*\(", "Marshal/YAML.load build arbitrary objects: use JSON or YAML.safe_load"),
    ("unsafe-deserialization", "CWE-502", "block", "csharp", r"\bBinaryFormatter\b|\bNetDataContractSerializer\b|TypeNameHandling\s*=\s*TypeNameHandling\.(?:All|Auto|Objects)", "BinaryFormatter/TypeNameHandling deserialise arbitrary types"),
    ("unsafe-deserialization", "CWE-502", "block", "javascript", r"require\(\s*['\"]node-serialize['\"]\)|\bserialize\.unserialize\s*\(", "node-serialize's unserialize runs functions in the data"),
    # -- memory safety (C/C++)
    ("gets", "CWE-242", "block", "c cpp", r"(?<![\w.>])gets\s*\(", "gets cannot bound its input: use fgets"),
    ("unbounded-copy", "CWE-120", "warn", "c cpp", r"(?<![\w.>])(?:strcpy|strcat|wcscpy|wcscat|stpcpy)\s*\(", "strcpy/strcat do not check the destination size: use strncpy/strlcpy or snprintf"),
    ("unbounded-copy", "CWE-120", "warn", "c cpp", r"(?<![\w.>])(?:sprintf|vsprintf)\s*\(", "sprintf does not check the buffer size: use snprintf"),
    ("unbounded-copy", "CWE-120", "warn", "c cpp", r"\bscanf\s*\(\s*\"[^\"]*%s", "scanf %s has no width: write %63s (the buffer size - 1)"),
    ("format-string", "CWE-134", "warn", "c cpp", r"(?<![\w.>])(?:printf|syslog)\s*\(\s*[a-z_]\w*\s*\)|\bfprintf\s*\(\s*\w+\s*,\s*[a-z_]\w*\s*\)", "a non-constant format string: printf(\"%s\", s)"),
    # -- TLS
    ("tls-verification-off", "CWE-295", "block", "python", r"\bverify\s*=\s*False\b|ssl\._create_unverified_context|\bCERT_NONE\b|check_hostname\s*=\s*False", "TLS certificate verification is off"),
    ("tls-verification-off", "CWE-295", "block", "javascript", r"rejectUnauthorized\s*:\s*false|NODE_TLS_REJECT_UNAUTHORIZED['\"]?\s*\]?\s*=\s*['\"]?0", "TLS certificate verification is off"),
    ("tls-verification-off", "CWE-295", "block", "go", r"InsecureSkipVerify\s*:\s*true", "TLS certificate verification is off"),
    ("tls-verification-off", "CWE-295", "block", "shell", r"\bcurl\b.*\s(?:-k|--insecure)\b|\bwget\b.*--no-check-certificate", "TLS certificate verification is off"),
    ("tls-verification-off", "CWE-295", "block", "php", r"CURLOPT_SSL_VERIFY(?:PEER|HOST)\s*,\s*(?:false|0)\b", "TLS certificate verification is off"),
    ("tls-verification-off", "CWE-295", "block", "java kotlin", r"ALLOW_ALL_HOSTNAME_VERIFIER|NoopHostnameVerifier|setHostnameVerifier\(\s*\(?[^)]*\)?\s*->\s*true|TrustAllStrategy", "TLS certificate or host verification is off"),
    ("tls-verification-off", "CWE-295", "block", "rust", r"danger_accept_invalid_(?:certs|hostnames)\(\s*true\s*\)", "TLS certificate verification is off"),
    ("tls-verification-off", "CWE-295", "block", "csharp", r"ServerCertificate(?:Custom)?ValidationCallback\s*=.*=>\s*true", "TLS certificate verification is off"),
    ("tls-verification-off", "CWE-295", "block", "ruby", r"VERIFY_NONE", "TLS certificate verification is off"),
    # -- file permissions and temporary files
    ("world-writable", "CWE-732", "warn", "*", r"\bchmod(?:Sync)?\s*\([^)]*\b0o?[0-7]?7[0-7][2367]\b|\bchmod\s+(?:-R\s+)?(?:0?777|a\+w|o\+w)\b|os\.Chmod\([^)]*0o?777|\bumask\s*\(\s*0+\s*\)",
     "world-writable permissions: anyone on the machine can change the file"),
    ("insecure-temp-file", "CWE-377", "warn", "python c cpp", r"\btempfile\.mktemp\s*\(|(?<![\w.])(?:tmpnam|tempnam|mktemp)\s*\(", "mktemp/tmpnam race: use mkstemp / NamedTemporaryFile"),
    # -- web
    ("xss", "CWE-79", "warn", "javascript", r"\.(?:innerHTML|outerHTML)\s*[+]?=\s*(?![\"'`][^\"'`$]*[\"'`]\s*;?\s*$)|\bdocument\.write\s*\(|dangerouslySetInnerHTML", "HTML built from data: use textContent or escape it"),
    ("xss", "CWE-79", "block", "php", r"\becho\s+\$_(?:GET|POST|REQUEST|COOKIE)", "echoing request data is reflected XSS: htmlspecialchars it"),
    ("file-inclusion", "CWE-98", "block", "php", r"\b(?:include|require)(?:_once)?\s*\(?\s*\$_(?:GET|POST|REQUEST|COOKIE)", "including a file named by the request runs attacker-chosen code"),
    ("path-traversal", "CWE-22", "warn", "python", r"\b(?:open|send_file)\s*\(\s*(?:request\.|f[\"'][^\"']*\{request)", "a path from the request can escape the folder (../): normalise and check it"),
    ("jwt-no-verify", "CWE-347", "block", "*", r"""algorithms\s*=\s*\[\s*["']none["']|["']verify_signature["']\s*:\s*False|\bjwt\.decode\([^)]*verify\s*=\s*False""", "JWT signature not verified"),
    # -- advice
    ("weak-random", "CWE-338", "advice", "python", r"\brandom\.(?:random|randint|choice|randrange)\s*\(", "the random module is predictable: use secrets for tokens and passwords"),
    ("weak-random", "CWE-338", "advice", "javascript", r"\bMath\.random\s*\(", "Math.random is predictable: use crypto.getRandomValues for secrets"),
    ("weak-random", "CWE-338", "advice", "c cpp", r"(?<![\w.])s?rand\s*\(", "rand() is predictable: use a CSPRNG for secrets"),
    ("debug-enabled", "CWE-489", "advice", "python", r"\.run\([^)]*debug\s*=\s*True|^\s*DEBUG\s*=\s*True", "debug mode exposes a console and stack traces"),
]

RULES: tuple[Rule, ...] = tuple(Rule(i, c, s, _langs(l), re.compile(p, re.MULTILINE), m) for i, c, s, l, p, m in _RULES)
LANGUAGES = ("python", "javascript", "java", "kotlin", "c", "cpp", "csharp", "php", "shell", "go", "rust", "ruby", "sql")


def rules_for(language: str) -> list[Rule]:
    return [r for r in RULES if not r.languages or language in r.languages]
