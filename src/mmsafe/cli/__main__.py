from mmsafe.cli.main import main

raise SystemExit(main())
