//! `projector dlq replay|purge` against letters that do not name the event holding their order
//! back (letters written behind the event that failed, letters from another history, letters
//! of entries that could not be decoded), and `dlq parked` with `--stream` for orders parked
//! with no letter at all.

use bus::DeadLetterQueue;
use events::{OrderState, RecordedEvent, order_stream_id};
use projector::ProjectionKind;
use projector::apply::{apply_batch, park_stream};
use projector::sweeper::entry_of;
use uuid::Uuid;

use crate::support::{self, Fate, World, commands, run_commands};

const PROJECTION: ProjectionKind = ProjectionKind::OrderSummaries;

/// A shipped order (six events) whose first `applied` events are applied and whose next one is
/// parked, as a consumer leaves an order after dead-lettering that event; returns its events.
async fn parked_order(w: &World, applied: usize) -> Vec<RecordedEvent> {
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let cmds = commands(order, Uuid::new_v4(), Fate::Shipped);
    run_commands(w.pool(), order, &cmds, &mut state).await;
    let stream = order_stream_id(order);
    let events = store::read_stream(w.pool(), &stream, 0, 100).await.unwrap();
    assert_eq!(events.len(), 6);
    let mut conn = w.pool().acquire().await.unwrap();
    apply_batch(&mut conn, PROJECTION, &events[..applied])
        .await
        .unwrap();
    let next = applied as i64 + 1;
    let parked = park_stream(&mut conn, PROJECTION, &stream, next, "boom")
        .await
        .unwrap();
    assert_eq!(parked, Some(next));
    events
}

/// The stored version and parked version of `stream`.
async fn bookkeeping(w: &World, stream: &str) -> (i64, Option<i64>) {
    sqlx::query_as(
        "SELECT version, parked_version FROM projection_streams \
         WHERE projection = $1 AND stream_id = $2",
    )
    .bind(PROJECTION.name())
    .bind(stream)
    .fetch_one(w.pool())
    .await
    .unwrap()
}

/// Writes a dead letter of `event` and returns its id.
async fn letter(dlq: &DeadLetterQueue, event: &RecordedEvent) -> String {
    dlq.dead_letter(PROJECTION.name(), &entry_of(event), "boom", 5, "test")
        .await
        .unwrap()
}

/// Runs `projector dlq <args>` on the world; returns whether it succeeded and its stdout.
async fn run_dlq(w: &World, args: &[&str]) -> (bool, String) {
    let output = support::projector_command(w, &[&["dlq"], args].concat())
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn purge_skips_only_the_event_its_letter_names_and_only_while_the_order_is_parked_at_it() {
    let w = World::new().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    // Versions 1-3 applied, parked at 4; a letter of version 5 (an entry given up on behind
    // the one that failed) and one of version 4.
    let events = parked_order(&w, 3).await;
    let stream = events[0].stream_id.clone();
    let behind = letter(&dlq, &events[4]).await;
    let failed = letter(&dlq, &events[3]).await;

    let (ok, stdout) = run_dlq(&w, &["purge", "order_summaries", "--id", &behind]).await;
    assert!(!ok, "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("FAILED") && stdout.contains("parked at version 4"),
        "{stdout}"
    );
    assert_eq!(
        bookkeeping(&w, &stream).await,
        (3, Some(4)),
        "nothing skipped"
    );
    assert_eq!(dlq.len(PROJECTION.name()).await.unwrap(), 2);

    let (ok, stdout) = run_dlq(&w, &["purge", "order_summaries", "--id", &failed]).await;
    assert!(ok, "{stdout}");
    assert!(stdout.contains("skipped version 4 of"), "{stdout}");
    assert_eq!(bookkeeping(&w, &stream).await, (6, None));
    // Version 5 was applied, not skipped: the order is shipped and paid.
    assert_eq!(support::summary_status(&w, &stream).await, "shipped");

    // The letter of version 5 names an event applied meanwhile: deleted, nothing skipped.
    let (ok, stdout) = run_dlq(&w, &["purge", "order_summaries", "--id", &behind]).await;
    assert!(ok && stdout.contains("nothing skipped"), "{stdout}");
    assert_eq!(dlq.len(PROJECTION.name()).await.unwrap(), 0);
    assert_eq!(bookkeeping(&w, &stream).await, (6, None));
}

#[tokio::test]
async fn purge_and_replay_refuse_a_letter_whose_event_the_store_does_not_hold_at_its_position() {
    let w = World::new().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    // An unrelated order parked at its version 4, and two letters of a lost history: one at
    // that event's position with another event id, one past the store's head.
    let events = parked_order(&w, 3).await;
    let stream = events[0].stream_id.clone();
    let mut lost = events[3].clone();
    lost.event_id = Uuid::new_v4();
    lost.stream_id = order_stream_id(Uuid::new_v4());
    let reused = letter(&dlq, &lost).await;
    let mut beyond = events[5].clone();
    beyond.event_id = Uuid::new_v4();
    beyond.global_position += 100;
    let past_head = letter(&dlq, &beyond).await;

    for id in [&reused, &past_head] {
        for action in ["purge", "replay"] {
            let (ok, stdout) = run_dlq(&w, &[action, "order_summaries", "--id", id]).await;
            assert!(!ok, "{stdout}");
            assert_eq!(stdout.lines().count(), 1, "{stdout}");
            assert!(
                stdout.contains("FAILED") && stdout.contains("another history"),
                "{stdout}"
            );
        }
    }
    assert_eq!(bookkeeping(&w, &stream).await, (3, Some(4)), "untouched");
    assert_eq!(dlq.len(PROJECTION.name()).await.unwrap(), 2);
}

/// More parked orders than a page (a systematic fault parks one per order): `dlq parked`
/// pages through all of them, oldest held-back event first, each page saying where the next
/// begins, and the last saying nothing more.
#[tokio::test]
async fn dlq_parked_pages_through_every_parked_order() {
    let w = World::new().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let mut held = Vec::new();
    for applied in [1, 2, 3] {
        let events = parked_order(&w, applied).await;
        held.push((events[applied].global_position, events[0].stream_id.clone()));
    }
    held.sort();

    let mut listed = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = projector::parked::list_page(w.pool(), &dlq, PROJECTION, after, 2)
            .await
            .unwrap();
        assert_eq!(page.total, 3);
        listed.extend(page.streams.iter().map(|p| {
            let (position, _, _) = p.event.clone().expect("the held-back event");
            (position, p.stream_id.clone())
        }));
        pages += 1;
        match page.next_after() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 2);
    assert_eq!(listed, held);

    // The command says where the next page begins, and takes it.
    let (ok, first) = run_dlq(&w, &["parked", "order_summaries"]).await;
    assert!(ok && !first.contains("--after-position"), "{first}");
    let (ok, second) = run_dlq(
        &w,
        &[
            "parked",
            "order_summaries",
            "--after-position",
            &held[0].0.to_string(),
        ],
    )
    .await;
    assert!(ok && !second.contains(&held[0].1), "{second}");
    assert!(
        second.contains(&held[1].1) && second.contains(&held[2].1),
        "{second}"
    );
    let (ok, refused) = run_dlq(&w, &["list", "order_summaries", "--after-position", "1"]).await;
    assert!(!ok, "{refused}");

    // Two streams whose held-back event the store does not hold (parked before a restore of
    // the database) come last; a page ending on one has no position to page by, and says how
    // to reach the rest.
    for _ in 0..2 {
        sqlx::query(
            "INSERT INTO projection_streams (projection, stream_id, version, parked_version, \
                                             parked_error) VALUES ($1, $2, 0, 1, 'lost')",
        )
        .bind(PROJECTION.name())
        .bind(order_stream_id(Uuid::new_v4()))
        .execute(w.pool())
        .await
        .unwrap();
    }
    let page = projector::parked::list_page(w.pool(), &dlq, PROJECTION, None, 4)
        .await
        .unwrap();
    assert!(page.more && page.streams[3].event.is_none(), "{page:?}");
    assert_eq!(page.next_after(), None);
    let rendered = projector::parked::render(&page);
    assert!(
        rendered.contains("resolve these to list the rest"),
        "{rendered}"
    );
}

#[tokio::test]
async fn an_order_parked_with_no_letter_is_listed_from_postgres_and_replayed_by_its_stream() {
    let w = World::new().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    // Parked at version 4 with no letter (a rebuild stopped before writing it), and another
    // order parked at its version 2 with two letters of that event (live and rebuild).
    let lost = parked_order(&w, 3).await;
    let stream = lost[0].stream_id.clone();
    let lettered = parked_order(&w, 1).await;
    letter(&dlq, &lettered[1]).await;
    letter(&dlq, &lettered[1]).await;

    let (parked, total) = projector::parked::list(w.pool(), &dlq, PROJECTION)
        .await
        .unwrap();
    assert_eq!(total, 2);
    let found: Vec<(&str, i64, i64, usize)> = parked
        .iter()
        .map(|p| (p.stream_id.as_str(), p.version, p.parked_version, p.letters))
        .collect();
    assert_eq!(
        found,
        vec![
            (stream.as_str(), 3, 4, 0),
            (lettered[0].stream_id.as_str(), 1, 2, 2)
        ],
        "oldest held-back event first, letters counted by event"
    );
    let (ok, table) = run_dlq(&w, &["parked", "order_summaries"]).await;
    assert!(
        ok && table.contains(&stream) && table.contains("2 parked stream(s)"),
        "{table}"
    );

    let (ok, stdout) = run_dlq(&w, &["replay", "order_summaries", "--stream", &stream]).await;
    assert!(ok, "{stdout}");
    assert!(stdout.contains("now at version 6"), "{stdout}");
    assert_eq!(bookkeeping(&w, &stream).await, (6, None));
    assert_eq!(support::summary_status(&w, &stream).await, "shipped");
    assert_eq!(
        dlq.len(PROJECTION.name()).await.unwrap(),
        2,
        "the other order's letters stay"
    );

    // Not parked any more: refused, nothing done.
    let (ok, stdout) = run_dlq(&w, &["purge", "order_summaries", "--stream", &stream]).await;
    assert!(!ok && stdout.contains("is not parked"), "{stdout}");
    assert_eq!(bookkeeping(&w, &stream).await, (6, None));
}

/// After a systematic fault is fixed, one `dlq replay` lifts every park: the letters' orders,
/// then the orders parked with no letter (while Redis refused it, past a rebuild's bound),
/// which a walk over the letters alone never finds. An order whose letter failed to replay is
/// not tried a second time in the same run.
#[tokio::test]
async fn a_replay_of_every_letter_also_replays_the_orders_parked_with_no_letter_once_each() {
    let w = World::new().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let lettered = parked_order(&w, 1).await;
    letter(&dlq, &lettered[1]).await;
    let unlettered = [parked_order(&w, 2).await, parked_order(&w, 4).await];
    let still_failing = parked_order(&w, 3).await;
    letter(&dlq, &still_failing[3]).await;
    let failing_stream = still_failing[0].stream_id.clone();
    support::refuse_placing(
        w.pool(),
        events::order_id_of_stream(&failing_stream).unwrap(),
    )
    .await;

    // What `dlq replay order_summaries` runs, a page of one at a time, so that the walk over
    // the parked orders goes on from page to page.
    let mut stdout = String::new();
    let done = projector::admin::resolve_all(
        w.pool(),
        &dlq,
        PROJECTION,
        projector::admin::Resolve::Replay,
        1,
        |page| stdout.push_str(&projector::admin::render_resolutions("replay", page)),
    )
    .await
    .unwrap();

    assert_eq!((done.ok, done.failed), (3, 1), "{stdout}");
    for order in [&lettered, &unlettered[0], &unlettered[1]] {
        let stream = &order[0].stream_id;
        assert_eq!(bookkeeping(&w, stream).await, (6, None), "{stdout}");
        assert_eq!(support::summary_status(&w, stream).await, "shipped");
    }
    for order in &unlettered {
        let line = format!("replay {}: ok: replayed", order[0].stream_id);
        assert!(stdout.contains(&line), "{stdout}");
    }
    assert_eq!(bookkeeping(&w, &failing_stream).await, (3, Some(4)));
    assert_eq!(
        stdout.matches("FAILED").count(),
        1,
        "the failing order is tried once, by its letter\n{stdout}"
    );
    // The error as the server gave it, with its SQLSTATE, not the line of PostgreSQL's source.
    assert!(
        stdout.contains("refusing order") && stdout.contains("(SQLSTATE P0001)"),
        "{stdout}"
    );
    assert!(!stdout.contains(" at line "), "{stdout}");
    assert!(
        !stdout.contains(&format!("replay {failing_stream}:")),
        "{stdout}"
    );
    assert_eq!(
        dlq.len(PROJECTION.name()).await.unwrap(),
        1,
        "its letter stays"
    );
    // The command line says so by its exit code.
    let (ok, stdout) = run_dlq(&w, &["replay", "order_summaries"]).await;
    assert!(!ok && stdout.contains("FAILED"), "{stdout}");

    // Fixed: the next run replays its letter, and finds nothing else parked.
    support::stop_refusing(w.pool()).await;
    let (ok, stdout) = run_dlq(&w, &["replay", "order_summaries"]).await;
    assert!(ok, "{stdout}");
    assert_eq!(bookkeeping(&w, &failing_stream).await, (6, None));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let (ok, stdout) = run_dlq(&w, &["replay", "order_summaries"]).await;
    assert!(
        ok && stdout.contains("no dead letters, no parked streams"),
        "{stdout}"
    );
}

#[tokio::test]
async fn purge_by_stream_skips_exactly_the_parked_event_and_deletes_the_letters_it_resolved() {
    let w = World::new().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    // Parked at version 4, with letters of version 4 and of version 5 (given up on behind it),
    // and a letter of another parked order.
    let events = parked_order(&w, 3).await;
    let stream = events[0].stream_id.clone();
    letter(&dlq, &events[3]).await;
    letter(&dlq, &events[4]).await;
    let other = parked_order(&w, 2).await;
    let other_letter = letter(&dlq, &other[2]).await;

    let (ok, stdout) = run_dlq(&w, &["purge", "order_summaries", "--stream", &stream]).await;
    assert!(ok, "{stdout}");
    assert!(
        stdout.contains("skipped version 4 of")
            && stdout.contains("applied 2 later event(s)")
            && stdout.contains("2 dead letter(s) of it deleted"),
        "{stdout}"
    );
    assert_eq!(bookkeeping(&w, &stream).await, (6, None));
    let left: Vec<String> = dlq
        .list(PROJECTION.name(), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(left, vec![other_letter]);
    assert_eq!(
        bookkeeping(&w, &other[0].stream_id).await,
        (2, Some(3)),
        "the other order is untouched"
    );
}

#[tokio::test]
async fn purge_by_stream_refuses_a_park_at_a_version_the_store_does_not_hold_and_replay_lifts_it() {
    let w = World::new().await;
    // Every event applied, then parked at version 7, which the store does not hold: the park
    // outlived a restore of the database to before that event.
    let events = parked_order(&w, 6).await;
    let stream = events[0].stream_id.clone();
    assert_eq!(bookkeeping(&w, &stream).await, (6, Some(7)));
    // A letter from before the restore names version 7 of the stream, an event the store
    // lost: with no event in the store to match, it counts for the stream it names.
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let mut lost = events[5].clone();
    lost.global_position += 100;
    lost.event_id = Uuid::new_v4();
    lost.stream_version = 7;
    letter(&dlq, &lost).await;
    let (parked, _) = projector::parked::list(w.pool(), &dlq, PROJECTION)
        .await
        .unwrap();
    assert_eq!(
        parked
            .iter()
            .map(|p| (p.event.is_none(), p.letters))
            .collect::<Vec<_>>(),
        [(true, 1)]
    );

    let (ok, stdout) = run_dlq(&w, &["purge", "order_summaries", "--stream", &stream]).await;
    assert!(!ok && stdout.contains("holds no version 7"), "{stdout}");
    assert_eq!(
        bookkeeping(&w, &stream).await,
        (6, Some(7)),
        "nothing skipped"
    );

    let (ok, stdout) = run_dlq(&w, &["replay", "order_summaries", "--stream", &stream]).await;
    assert!(ok, "{stdout}");
    assert_eq!(bookkeeping(&w, &stream).await, (6, None));
}

/// The letter of an entry that could not be decoded names an order but no event: such an entry
/// never parks its order, so `dlq parked` counts the letter for no order, `dlq replay` refuses
/// it and `dlq purge` deletes it alone, leaving a park it did not cause in place (here an
/// older release's, at a version the store does not hold) for `--stream` to lift. So whether
/// its position is unreadable or only its data is, while its position and event id are those
/// of a real event: what the consumer could not decode, the admin commands do not read as an
/// event either.
#[tokio::test]
async fn a_letter_naming_an_order_but_no_event_holds_nothing_back_and_its_purge_leaves_the_order_parked()
 {
    let w = World::new().await;
    let events = parked_order(&w, 6).await;
    let stream = events[0].stream_id.clone();
    let real = &events[5];
    let (position, event_id) = (real.global_position.to_string(), real.event_id.to_string());
    let letters: [&[(&str, &str)]; 2] = [
        &[("stream_id", &stream), ("position", "x")],
        &[
            ("stream_id", &stream),
            ("position", &position),
            ("event_id", &event_id),
            ("stream_version", "6"),
            ("data", "{broken"),
        ],
    ];
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    for fields in letters {
        let mut redis = w.redis.clone();
        let mut xadd = redis::cmd("XADD");
        xadd.arg(w.keys.dlq(PROJECTION.name())).arg("*");
        for (name, value) in fields {
            xadd.arg(*name).arg(*value);
        }
        let undecodable: String = xadd
            .arg("error")
            .arg("entry 1-0: cannot be decoded")
            .query_async(&mut redis)
            .await
            .unwrap();
        let (parked, _) = projector::parked::list(w.pool(), &dlq, PROJECTION)
            .await
            .unwrap();
        assert_eq!(
            parked.iter().map(|p| p.letters).collect::<Vec<_>>(),
            [0],
            "{fields:?}: the letter counts for no order"
        );

        // By its id: a replay of every letter would go on to replay the parked order itself.
        let (ok, stdout) = run_dlq(&w, &["replay", "order_summaries", "--id", &undecodable]).await;
        assert!(
            !ok && stdout.contains("names no event"),
            "{fields:?}: {stdout}"
        );
        assert_eq!(bookkeeping(&w, &stream).await, (6, Some(7)));

        let (ok, stdout) = run_dlq(&w, &["purge", "order_summaries", "--id", &undecodable]).await;
        assert!(ok, "{fields:?}: {stdout}");
        assert!(
            stdout.contains("nothing skipped or un-parked")
                && stdout.contains(&format!(
                    "{stream}, which it names, stays parked at version 7"
                )),
            "{fields:?}: {stdout}"
        );
        assert_eq!(dlq.len(PROJECTION.name()).await.unwrap(), 0);
        assert_eq!(
            bookkeeping(&w, &stream).await,
            (6, Some(7)),
            "{fields:?}: the order stays parked"
        );
    }

    // A replay of everything replays the parked order itself, which no letter can resolve.
    let (ok, stdout) = run_dlq(&w, &["replay", "order_summaries"]).await;
    assert!(
        ok && stdout.contains(&format!(
            "replay {stream}: ok: replayed (parked at version 7"
        )),
        "{stdout}"
    );
    assert_eq!(bookkeeping(&w, &stream).await, (6, None));
}

#[tokio::test]
async fn dlq_list_and_show_print_the_letter_with_every_contract_field() {
    let w = World::new().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let events = parked_order(&w, 1).await;
    let id = letter(&dlq, &events[1]).await;

    let (ok, table) = run_dlq(&w, &["list", "order_summaries"]).await;
    assert!(ok, "{table}");
    for column in [
        id.as_str(),
        &events[1].global_position.to_string(),
        &events[1].stream_id,
        &events[1].event_type,
        "boom",
        "1 dead letter(s)",
    ] {
        assert!(table.contains(column), "{column} missing from\n{table}");
    }

    let (ok, shown) = run_dlq(&w, &["show", "order_summaries", "--id", &id]).await;
    assert!(ok, "{shown}");
    let letter: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(letter["id"], id.as_str());
    assert_eq!(letter["error"], "boom");
    assert_eq!(letter["attempts"], 5);
    assert_eq!(letter["consumer"], "test");
    for field in ["original_id", "failed_at"] {
        assert!(letter[field].is_string(), "{field} in {shown}");
    }
    let event = &letter["event"];
    for field in [
        "position",
        "event_id",
        "stream_id",
        "stream_version",
        "event_type",
        "schema_version",
        "recorded_at",
    ] {
        assert!(event[field].is_string(), "{field} in {shown}");
    }
    assert_eq!(event["event_id"], events[1].event_id.to_string());
    assert!(
        event["data"].is_object() && event["metadata"].is_object(),
        "{shown}"
    );

    let (ok, _) = run_dlq(&w, &["show", "order_summaries", "--id", "1-1"]).await;
    assert!(!ok, "an unknown id fails");
}

#[tokio::test]
async fn dlq_list_pages_through_more_letters_than_one_page_holds() {
    let w = World::new().await;
    support::undecodable_letters(&w, "order_summaries", projector::admin::DLQ_PAGE + 2).await;

    let (ok, first) = run_dlq(&w, &["list", "order_summaries"]).await;
    assert!(ok, "{first}");
    let next = first
        .lines()
        .find_map(|l| l.split("the next page: --after ").nth(1))
        .unwrap_or_else(|| panic!("no next page named in\n{first}"));
    assert!(first.contains("1002 dead letter(s) in all"), "{first}");
    let (ok, second) = run_dlq(&w, &["list", "order_summaries", "--after", next]).await;
    assert!(ok, "{second}");
    assert!(
        second.lines().any(|l| l == "2 dead letter(s)") && !second.contains("next page"),
        "{second}"
    );
    assert!(
        !second.contains(next),
        "the page starts after the id it was given"
    );
    // After the largest id there is: an empty page, not Redis' refusal of the range.
    let (ok, last) = run_dlq(
        &w,
        &[
            "list",
            "order_summaries",
            "--after",
            "18446744073709551615-18446744073709551615",
        ],
    )
    .await;
    assert!(ok, "{last}");
    assert!(last.lines().any(|l| l == "0 dead letter(s)"), "{last}");

    // Only `list` pages: a replay or purge given --after is refused, not run on every letter.
    for action in ["replay", "purge"] {
        let (ok, stdout) = run_dlq(&w, &[action, "order_summaries", "--after", next]).await;
        assert!(!ok, "{action}: {stdout}");
    }
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    assert_eq!(dlq.len(PROJECTION.name()).await.unwrap(), 1002);
}

#[tokio::test]
async fn a_purge_whose_catch_up_fails_later_keeps_what_applied_and_parks_at_the_event_that_failed()
{
    let w = World::new().await;
    // Parked at version 3; version 4 applies, version 5 (the payment) is refused.
    let events = parked_order(&w, 2).await;
    let stream = events[0].stream_id.clone();
    let order = events::order_id_of_stream(&stream).unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION refuse_paying() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION 'refusing the payment of {order}'; END $$; \
         CREATE TRIGGER refuse_paying BEFORE INSERT OR UPDATE ON order_summaries FOR EACH ROW \
           WHEN (NEW.order_id = '{order}' AND NEW.version >= 5) EXECUTE FUNCTION refuse_paying();"
    )))
    .execute(w.pool())
    .await
    .unwrap();

    let (ok, stdout) = run_dlq(&w, &["purge", "order_summaries", "--stream", &stream]).await;
    assert!(ok, "{stdout}");
    assert!(
        stdout.contains("skipped version 3 of") && stdout.contains("parked again at version 5"),
        "{stdout}"
    );
    assert_eq!(
        bookkeeping(&w, &stream).await,
        (4, Some(5)),
        "version 4 applied, parked at the version that failed"
    );
    let (ok, table) = run_dlq(&w, &["parked", "order_summaries"]).await;
    assert!(ok && table.contains("refusing the payment"), "{table}");
}

/// A park holds an order back from the event that failed, and only while that event is
/// unapplied: parking a version the projection has applied meanwhile parks nothing; parking a
/// version beyond the applied one (the entries between held by another consumer, or lost)
/// applies the events between from the store first and parks at the failed one, or, when one
/// of them fails too, at that one with its own error. So reads never name a held-back version
/// that did not fail, and a purge skips exactly the event that failed.
#[tokio::test]
async fn a_park_holds_back_from_the_event_that_failed_and_never_from_one_applied_already() {
    let w = World::new().await;
    let shipped = |refused: bool| {
        let w = &w;
        async move {
            let order = Uuid::new_v4();
            if refused {
                // Refuses its placing (version 4) and everything after it.
                support::refuse_placing(w.pool(), order).await;
            }
            let cmds = commands(order, Uuid::new_v4(), Fate::Shipped);
            run_commands(w.pool(), order, &cmds, &mut OrderState::default()).await;
            let stream = order_stream_id(order);
            let events = store::read_stream(w.pool(), &stream, 0, 100).await.unwrap();
            (stream, events)
        }
    };
    let mut conn = w.pool().acquire().await.unwrap();

    let (stream, events) = shipped(false).await;
    apply_batch(&mut conn, PROJECTION, &events[..3])
        .await
        .unwrap();
    for applied in [2, 3] {
        let parked = park_stream(&mut conn, PROJECTION, &stream, applied, "boom")
            .await
            .unwrap();
        assert_eq!(
            parked, None,
            "parked for version {applied}, applied already"
        );
        assert_eq!(bookkeeping(&w, &stream).await, (3, None));
    }
    let parked = park_stream(&mut conn, PROJECTION, &stream, 5, "boom")
        .await
        .unwrap();
    assert_eq!(parked, Some(5));
    assert_eq!(
        bookkeeping(&w, &stream).await,
        (4, Some(5)),
        "version 4 applied from the store, parked at the version that failed"
    );
    assert_eq!(support::summary_status(&w, &stream).await, "placed");
    let (ok, stdout) = run_dlq(&w, &["purge", "order_summaries", "--stream", &stream]).await;
    assert!(ok && stdout.contains("skipped version 5 of"), "{stdout}");
    assert_eq!(bookkeeping(&w, &stream).await, (6, None));

    let (stream, events) = shipped(true).await;
    apply_batch(&mut conn, PROJECTION, &events[..2])
        .await
        .unwrap();
    let parked = park_stream(&mut conn, PROJECTION, &stream, 6, "boom")
        .await
        .unwrap();
    assert_eq!(parked, Some(4), "parked at the first version that fails");
    assert_eq!(bookkeeping(&w, &stream).await, (3, Some(4)));
    let error: Option<String> = sqlx::query_scalar(
        "SELECT parked_error FROM projection_streams WHERE projection = $1 AND stream_id = $2",
    )
    .bind(PROJECTION.name())
    .bind(&stream)
    .fetch_one(w.pool())
    .await
    .unwrap();
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("refusing order")),
        "{error:?}"
    );
}
