//! The batch script fed to sbatch on stdin: `#!/bin/sh` and one `exec` line that runs
//! crunch-run with `GatewayAuthSecret` in its environment. Pure functions.

use arvados::config::Cluster;

/// `word` in single quotes for `/bin/sh`: each `'` becomes `'\''`, everything else is literal.
pub fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// `#!/bin/sh` + `NAME='value' … exec 'word' …` + newline.
pub fn batch_script(env: &[(&str, &str)], words: &[&str]) -> String {
    let mut line = String::new();
    for (name, value) in env {
        line.push_str(name);
        line.push('=');
        line.push_str(&shell_quote(value));
        line.push(' ');
    }
    line.push_str("exec");
    for w in words {
        line.push(' ');
        line.push_str(&shell_quote(w));
    }
    format!("#!/bin/sh\n{line}\n")
}

/// The script for one container: crunch-run (with `CrunchRunArgumentsList` and
/// `--runtime-engine`) on its uuid, with the container's `GatewayAuthSecret`.
pub fn container_script(cluster: &Cluster, uuid: &str) -> String {
    let c = &cluster.containers;
    let engine = format!("--runtime-engine={}", c.runtime_engine);
    let mut words: Vec<&str> = vec![c.crunch_run_command.as_str()];
    words.extend(c.crunch_run_arguments_list.iter().map(String::as_str));
    words.push(&engine);
    words.push(uuid);
    let secret = arvados::gateway_auth_secret(&cluster.system_root_token, uuid);
    batch_script(&[("GatewayAuthSecret", &secret)], &words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(env: &[(&str, &str)], words: &[&str]) -> String {
        let s = batch_script(env, words);
        let body = s.strip_prefix("#!/bin/sh\n").expect("shebang first");
        body.strip_suffix('\n').expect("final newline").to_string()
    }

    #[test]
    fn ac_slurm_31_no_words() {
        assert_eq!(line(&[], &[]), "exec");
    }

    #[test]
    fn ac_slurm_32_one_word() {
        assert_eq!(line(&[], &["foo"]), "exec 'foo'");
    }

    #[test]
    fn ac_slurm_33_a_word_with_a_space() {
        assert_eq!(line(&[], &["foo", "bar baz"]), "exec 'foo' 'bar baz'");
    }

    #[test]
    fn ac_slurm_34_quotes_and_newlines() {
        assert_eq!(
            line(&[], &["foo\"", "'waz 'qux\n"]),
            "exec 'foo\"' ''\\''waz '\\''qux\n'"
        );
    }

    #[test]
    fn ac_slurm_35_environment() {
        assert_eq!(
            line(&[("foo", "b'ar")], &["sh", "-c", "echo $foo"]),
            "foo='b'\\''ar' exec 'sh' '-c' 'echo $foo'"
        );
    }

    #[test]
    fn ac_slurm_s9_script_and_secret() {
        let cl = Cluster {
            system_root_token: "xyzzy".into(),
            ..Default::default()
        };
        let s = container_script(&cl, "zzzzz-dz642-queuedcontainer");
        assert_eq!(
            s.lines().nth(1).unwrap(),
            "GatewayAuthSecret='d71921a0fffb2f51d5994d3a6003cc2b85a21784d755245f63e5390357977f59' exec 'crunch-run' '--runtime-engine=docker' 'zzzzz-dz642-queuedcontainer'"
        );
    }

    #[test]
    fn the_script_runs_in_sh_with_the_words_intact() {
        let words = ["printf", "%s|", "a b", "it's", "$HOME", "x\ny"];
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(batch_script(&[], &words))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b|it's|$HOME|x\ny|");
    }
}
